"""Prompt text: what the student is asked and what a privileged teacher additionally sees.

Kept in one place so training, evaluation and every teacher backend phrase a task identically.
"""

from __future__ import annotations

ANSWER_INSTRUCTION = "Solve the problem step by step. End with the final answer on its own line as '#### <answer>'."


def student_messages(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{question}\n\n{ANSWER_INSTRUCTION}"}]


def privileged_messages(question: str, reference: str | None) -> list[dict[str, str]]:
    """The student's prompt plus the reference solution (self-distillation with privileged information)."""
    if not reference:
        return student_messages(question)
    content = (
        f"{question}\n\n{ANSWER_INSTRUCTION}\n\n"
        f"Here is a correct solution. Use it to write your own answer:\n{reference}"
    )
    return [{"role": "user", "content": content}]

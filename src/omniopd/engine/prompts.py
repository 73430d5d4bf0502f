"""Prompt text: what the student is asked and what a privileged teacher additionally sees.

Kept in one place so training, evaluation and every teacher backend phrase a task identically.
"""

from __future__ import annotations

ANSWER_INSTRUCTION = "Solve the problem step by step. End with the final answer on its own line as '#### <answer>'."


CODE_INSTRUCTION = "Write the complete Python function in a single ```python code block."


def _with_instruction(question: str, instruction: str | None) -> str:
    instruction = ANSWER_INSTRUCTION if instruction is None else instruction
    return f"{question}\n\n{instruction}" if instruction else question


def student_messages(question: str, instruction: str | None = None) -> list[dict[str, str]]:
    """The task as the student sees it; ``instruction`` None means the math answer format, "" none."""
    return [{"role": "user", "content": _with_instruction(question, instruction)}]


def privileged_messages(question: str, reference: str | None, instruction: str | None = None) -> list[dict[str, str]]:
    """The student's prompt plus the reference solution (self-distillation with privileged information)."""
    if not reference:
        return student_messages(question, instruction)
    content = (
        f"{_with_instruction(question, instruction)}\n\n"
        f"Here is a correct solution. Use it to write your own answer:\n{reference}"
    )
    return [{"role": "user", "content": content}]

"""Exactly what each continuation protocol sends for a given prefix, and how answers are joined back."""

from __future__ import annotations

from omniopd.engine.prompts import ANSWER_INSTRUCTION
from omniopd.teachers.base import ContinuationRequest
from omniopd.teachers.protocols import (
    completion_prompt,
    instruct_messages,
    instruct_postprocess,
    join_continuation,
    prefill_messages,
    prefill_postprocess,
    strip_echo,
)

Q = "Tom has 3 apples and buys 2 more. How many apples does he have?"
TASK = f"{Q}\n\n{ANSWER_INSTRUCTION}"


class StubTokenizer:
    """The two things ``completion_prompt`` uses from a tokenizer: its chat template and BOS behaviour."""

    chat_template = "stub"
    bos_token = "<s>"
    bos_token_id = 1

    def __init__(self, adds_bos: bool) -> None:
        self.adds_bos = adds_bos

    def apply_chat_template(self, messages, add_generation_prompt: bool, tokenize: bool) -> str:
        assert add_generation_prompt and not tokenize
        body = "".join(f"<|{m['role']}|>{m['content']}<|end|>" for m in messages)
        return f"<s>{body}<|assistant|>"

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": ([1] if self.adds_bos else []) + [7]}


def test_completion_protocol_sends_template_plus_prefix_verbatim() -> None:
    req = ContinuationRequest(question=Q, prefix="He starts with 3 apples. ", reference="3 + 2 = 5\n#### 5")
    # no tokenizer: the plain template, then the prefix exactly as the student wrote it (trailing space kept)
    assert completion_prompt(req) == f"Question:\n{TASK}\n\nAnswer:\nHe starts with 3 apples. "
    # the teacher's chat template; its BOS dropped because the server's tokenizer adds one itself
    expected = f"<|user|>{TASK}<|end|><|assistant|>He starts with 3 apples. "
    assert completion_prompt(req, tokenizer=StubTokenizer(adds_bos=True)) == expected
    assert completion_prompt(req, tokenizer=StubTokenizer(adds_bos=False)) == "<s>" + expected
    assert completion_prompt(req, tokenizer=StubTokenizer(adds_bos=True), strip_bos=False) == "<s>" + expected
    # privileged: the reference is in the task, only when asked for
    privileged = completion_prompt(req, privileged=True)
    assert "Here is a correct solution" in privileged and "#### 5" in privileged
    assert privileged.endswith("Answer:\nHe starts with 3 apples. ")


def test_prefill_protocol_strips_trailing_whitespace_and_rejoins() -> None:
    req = ContinuationRequest(question=Q, prefix="He starts with 3 apples.\n\nThen he buys ")
    messages, trailing = prefill_messages(req)
    assert messages == [
        {"role": "user", "content": TASK},
        {"role": "assistant", "content": "He starts with 3 apples.\n\nThen he buys"},  # no trailing space
    ]
    assert trailing == " "
    # the model continues "...buys" and usually starts with the space the prefill lost: drop it once
    assert prefill_postprocess(" 2 more apples.", req.prefix) == "2 more apples."
    assert (
        req.prefix + prefill_postprocess(" 2 more apples.", req.prefix)
        == "He starts with 3 apples.\n\nThen he buys 2 more apples."
    )
    # a continuation without the space: the prefix already has it
    assert req.prefix + prefill_postprocess("2 more.", req.prefix) == "He starts with 3 apples.\n\nThen he buys 2 more."
    # other whitespace: the student's whitespace stands in for the teacher's
    assert join_continuation("\n2 more.", " ") == "2 more."
    # more whitespace of the same kind than was stripped: the extra is the teacher's and is kept
    assert join_continuation("\n\nStep 2.", "\n") == "\nStep 2."
    # no trailing whitespace: nothing stripped, the text is joined as returned
    plain = ContinuationRequest(question=Q, prefix="He has 3")
    assert prefill_messages(plain)[0][-1] == {"role": "assistant", "content": "He has 3"}
    assert prefill_postprocess(" apples", plain.prefix) == " apples"
    # an empty or all-whitespace prefix sends no assistant turn
    assert prefill_messages(ContinuationRequest(question=Q, prefix="  \n"))[0] == [{"role": "user", "content": TASK}]


def test_instruct_protocol_message_and_cleanup() -> None:
    req = ContinuationRequest(question=Q, prefix="He starts with 3 apples. Then he buys 2 more, so ")
    messages = instruct_messages(req, max_new_tokens=20)
    assert messages == [
        {
            "role": "user",
            "content": (
                "Below is a task and the beginning of an answer to it. Continue the answer from exactly where it "
                "stops, as its author would, even if it stops in the middle of a word or a sentence.\n\n"
                f"<task>\n{TASK}\n</task>\n\n"
                "<partial_answer>\nHe starts with 3 apples. Then he buys 2 more, so </partial_answer>\n\n"
                "Write only the next 20 tokens or so (about 15 words) of the answer. The partial answer ends "
                "with a space, so start with the next word. Reply with the continuation text only: no preamble, "
                "no commentary, no quotation marks, and do not repeat any part of the partial answer."
            ),
        }
    ]
    # a preamble is stripped
    assert (
        instruct_postprocess("Here is the continuation:\n\nhe has 3 + 2 = 5 apples.", req.prefix)
        == "he has 3 + 2 = 5 apples."
    )
    assert instruct_postprocess("Sure! Here's the next part of the answer: he has 5.", req.prefix) == "he has 5."
    assert instruct_postprocess("**Continuation:**\nhe has 5.", req.prefix) == "he has 5."
    assert instruct_postprocess('"he has 5 apples."', req.prefix) == "he has 5 apples."
    assert instruct_postprocess("<continuation>he has 5.</continuation>", req.prefix) == "he has 5."
    # an echo of the whole partial answer, or of its tail, is stripped
    assert instruct_postprocess(req.prefix + "he has 5 apples.", req.prefix) == "he has 5 apples."
    assert instruct_postprocess("Then he buys 2 more, so he has 5 apples.", req.prefix) == "he has 5 apples."
    assert (
        instruct_postprocess("Here is the continuation: Then he buys 2 more, so he has 5.", req.prefix) == "he has 5."
    )
    # a prefix without trailing whitespace keeps the answer's leading whitespace
    assert instruct_postprocess(" 5 apples.", "So he has") == " 5 apples."
    # the empty prefix asks for the beginning of an answer
    first = instruct_messages(ContinuationRequest(question=Q, prefix=""), max_new_tokens=8)[0]["content"]
    assert "Write only the first 8 tokens or so" in first and "<partial_answer>" not in first
    # a newline ending is spelled out
    nl = instruct_messages(ContinuationRequest(question=Q, prefix="Step 1.\n"), max_new_tokens=8)[0]["content"]
    assert "<partial_answer>\nStep 1.\n</partial_answer>" in nl and "ends with a line break" in nl


def test_strip_echo_keeps_a_continuation_that_only_looks_like_the_prefix() -> None:
    prefix = "First we compute the total number of apples"
    # too short an overlap to be an echo
    assert strip_echo("apples is 5.", prefix) == "apples is 5."
    # an overlap that starts mid-word in the prefix is not an echo
    assert strip_echo("ompute the total number of apples is 5", prefix) == "ompute the total number of apples is 5"
    # a real tail echo (word boundary, >= 16 characters)
    assert strip_echo("the total number of apples: 5.", prefix) == ": 5."
    # nothing to strip
    assert strip_echo("is 5.", prefix) == "is 5."

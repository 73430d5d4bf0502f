"""The three ways a text-only API teacher continues a student prefix, and every prompt template they use.

The contract (see ``teachers.base``) is "continue this text prefix for about C tokens, N samples,
temperature T". A teacher behind an API honours it with one of three protocols:

``completion``  raw text to a completions endpoint (vLLM, SGLang, llama.cpp, ``transformers serve``, any
                OpenAI-compatible ``/v1/completions``): the teacher's chat template applied to the task
                (or :data:`PLAIN_COMPLETION_TEMPLATE` when no template is known), then the student's
                prefix verbatim. Exact: the model literally continues the prefix, as in the paper.
``prefill``     a chat request whose last message is the partial assistant answer (Anthropic Messages).
                The API rejects a final assistant turn that ends in whitespace, so trailing whitespace is
                stripped from the prefill and accounted for when the continuation is joined
                (:func:`join_continuation`). Near-exact: only the whitespace at the seam is re-decided.
``instruct``    chat-only APIs without prefill (OpenAI chat, Gemini): an instruction carrying the task and
                the partial answer asks for the next ~C tokens only. The model *describes* a
                continuation rather than being conditioned on the prefix, so it may add a preamble
                ("Here is the continuation:") or echo the end of the partial answer; both are stripped
                (:func:`instruct_postprocess`). Approximate: the paper's text-only teachers (Claude,
                Gemini) must have been queried some such way, but the paper does not publish its prompt;
                this one is ours.

Privileged information. With ``privileged=True`` and a request that carries ``reference``, the task is
phrased by :func:`omniopd.engine.prompts.privileged_messages` (the reference solution is shown to the teacher);
otherwise by :func:`omniopd.engine.prompts.student_messages`, exactly as the student saw it.

Everything here is pure (no I/O): ``*_prompt``/``*_messages`` build exactly what is sent for one request,
``*_postprocess`` turn what comes back into text that reads right after ``request.prefix``.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from omniopd.engine.prompts import privileged_messages, student_messages
from omniopd.teachers.base import ContinuationRequest

ProtocolName = Literal["completion", "prefill", "instruct"]
PROTOCOLS: tuple[ProtocolName, ...] = ("completion", "prefill", "instruct")

# --------------------------------------------------------------------------------------------------
# Templates (all of them)
# --------------------------------------------------------------------------------------------------

#: completion protocol, when the teacher's chat template is unknown (no ``tokenizer`` given): a plain
#: question/answer layout that base and instruct models both continue sensibly.
PLAIN_COMPLETION_TEMPLATE = "Question:\n{task}\n\nAnswer:\n"
#: stop sequences sent with the plain template, so a base model does not go on to invent a next question.
PLAIN_COMPLETION_STOP: tuple[str, ...] = ("\nQuestion:",)

#: instruct protocol, non-empty partial answer. The closing tag follows the partial answer with no
#: newline so the model sees exactly where it stops (a trailing space or line break is also spelled out
#: by :data:`INSTRUCT_ENDING_HINTS`).
INSTRUCT_TEMPLATE = (
    "Below is a task and the beginning of an answer to it. Continue the answer from exactly where it "
    "stops, as its author would, even if it stops in the middle of a word or a sentence.\n\n"
    "<task>\n{task}\n</task>\n\n"
    "<partial_answer>\n{partial}</partial_answer>\n\n"
    "Write only the next {max_new_tokens} tokens or so (about {words} words) of the answer.{ending_hint} "
    "Reply with the continuation text only: no preamble, no commentary, no quotation marks, and do not "
    "repeat any part of the partial answer."
)
#: instruct protocol, empty partial answer (a chunk at the very start of the response).
INSTRUCT_EMPTY_TEMPLATE = (
    "Below is a task. Begin answering it as you normally would.\n\n"
    "<task>\n{task}\n</task>\n\n"
    "Write only the first {max_new_tokens} tokens or so (about {words} words) of your answer. "
    "Reply with the answer text only: no preamble and no commentary."
)
INSTRUCT_ENDING_HINTS = {
    "newline": " The partial answer ends with a line break, so start on the new line.",
    "space": " The partial answer ends with a space, so start with the next word.",
}
#: rough English tokens -> words ratio used only to phrase the length request
WORDS_PER_TOKEN = 0.75


def task_messages(request: ContinuationRequest, privileged: bool = False) -> list[dict[str, str]]:
    """The task as chat messages: the student's prompt, plus the reference for a privileged teacher."""
    if privileged and request.reference:
        return privileged_messages(request.question, request.reference, request.instruction)
    return student_messages(request.question, request.instruction)


def task_text(request: ContinuationRequest, privileged: bool = False) -> str:
    """The task as one string (the user content of :func:`task_messages`)."""
    return "\n\n".join(m["content"] for m in task_messages(request, privileged))


# --------------------------------------------------------------------------------------------------
# completion
# --------------------------------------------------------------------------------------------------


def tokenizer_adds_bos(tokenizer: Any) -> bool:
    """Whether encoding plain text with this tokenizer prepends its BOS token (servers encode that way)."""
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos_id is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == bos_id


def completion_prompt(
    request: ContinuationRequest,
    *,
    privileged: bool = False,
    tokenizer: Any = None,
    strip_bos: bool = True,
) -> str:
    """Exactly the ``prompt`` string sent to ``/v1/completions``.

    With a ``tokenizer`` (the teacher's own), its chat template with the generation prompt, then the
    prefix verbatim, the same text :class:`omniopd.teachers.local.LocalTeacher` feeds its model. Servers
    tokenize the prompt *with* special tokens, so when the tokenizer adds a BOS itself and the template
    also starts with it, the template's copy is dropped (``strip_bos``) to avoid a doubled BOS.
    Without a tokenizer: :data:`PLAIN_COMPLETION_TEMPLATE` + prefix.
    """
    if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
        head = PLAIN_COMPLETION_TEMPLATE.format(task=task_text(request, privileged))
    else:
        head = tokenizer.apply_chat_template(
            task_messages(request, privileged), add_generation_prompt=True, tokenize=False
        )
        bos = getattr(tokenizer, "bos_token", None)
        if strip_bos and bos and head.startswith(bos) and tokenizer_adds_bos(tokenizer):
            head = head[len(bos) :]
    return head + request.prefix


def in_process_prompt(request: ContinuationRequest, *, privileged: bool, tokenizer: Any) -> str:
    """What an in-process teacher (HF or llama.cpp) tokenizes: :func:`completion_prompt` with the template's own
    BOS kept (nothing adds a second one), and for a base model without a chat template its BOS in front."""
    text = completion_prompt(request, privileged=privileged, tokenizer=tokenizer, strip_bos=False)
    if getattr(tokenizer, "chat_template", None) is None and tokenizer.bos_token:
        text = tokenizer.bos_token + text
    return text


def completion_postprocess(text: str) -> str:
    """The completion protocol is exact: the returned text already continues the prefix."""
    return text


# --------------------------------------------------------------------------------------------------
# prefill
# --------------------------------------------------------------------------------------------------


def split_trailing_whitespace(prefix: str) -> tuple[str, str]:
    """(prefix without trailing whitespace, the stripped whitespace)."""
    body = prefix.rstrip()
    return body, prefix[len(body) :]


def prefill_messages(request: ContinuationRequest, *, privileged: bool = False) -> tuple[list[dict[str, str]], str]:
    """(messages to send, trailing whitespace stripped from the prefill).

    The partial answer becomes a final assistant turn with its trailing whitespace removed (Anthropic
    rejects a prefill ending in whitespace). An empty or all-whitespace prefix sends no assistant turn:
    the model starts its answer afresh.
    """
    body, trailing = split_trailing_whitespace(request.prefix)
    messages = list(task_messages(request, privileged))
    if body:
        messages.append({"role": "assistant", "content": body})
    return messages, trailing


def join_continuation(text: str, trailing_ws: str) -> str:
    """Continuation text that reads right after the *original* prefix (which ends with ``trailing_ws``).

    The model continued ``prefix.rstrip()``; the caller will place the result after the full prefix.

    * The continuation starts with the stripped whitespace: drop that much, keep any extra the model
      wrote (``ws="\\n"``, ``text="\\n\\nNext"`` -> ``"\\nNext"``, so ``prefix + result`` is what the
      teacher wrote).
    * It starts with other whitespace: the student's whitespace stands in for the teacher's
      (``ws=" "``, ``text="\\nNext"`` -> ``"Next"``).
    * It starts with no whitespace: returned unchanged, the prefix already supplies the separator
      (``ws=" "``, ``text="42."`` -> ``"42."``, reads ``"... is 42."``).
    """
    if not trailing_ws:
        return text
    if text.startswith(trailing_ws):
        return text[len(trailing_ws) :]
    lead = len(text) - len(text.lstrip())
    return text[lead:]


def prefill_postprocess(text: str, prefix: str) -> str:
    return join_continuation(text, split_trailing_whitespace(prefix)[1])


# --------------------------------------------------------------------------------------------------
# instruct
# --------------------------------------------------------------------------------------------------


def _ending_hint(prefix: str) -> str:
    _, trailing = split_trailing_whitespace(prefix)
    if not trailing or not prefix.strip():
        return ""
    return INSTRUCT_ENDING_HINTS["newline" if "\n" in trailing else "space"]


def instruct_messages(
    request: ContinuationRequest, max_new_tokens: int, *, privileged: bool = False
) -> list[dict[str, str]]:
    """Exactly the chat messages sent: one user turn carrying the task and the partial answer."""
    task = task_text(request, privileged)
    words = max(1, round(max_new_tokens * WORDS_PER_TOKEN))
    if not request.prefix.strip():
        content = INSTRUCT_EMPTY_TEMPLATE.format(task=task, max_new_tokens=max_new_tokens, words=words)
    else:
        content = INSTRUCT_TEMPLATE.format(
            task=task,
            partial=request.prefix,
            max_new_tokens=max_new_tokens,
            words=words,
            ending_hint=_ending_hint(request.prefix),
        )
    return [{"role": "user", "content": content}]


_PREAMBLE = re.compile(
    r"""^\s*
    (?:(?:sure|certainly|okay|ok|of\ course|absolutely|alright)\b[!,.]?\s*)?   # politeness
    \**                                                                       # markdown bold
    (?:
        here(?:'s|\u2019s|\ is|\ are)\b[^\n:]{0,100}                               # "Here is the continuation"
      | (?:the\ )?(?:next\ part|continuation|continued\ answer|continuing)\b[^\n:]{0,100}
      | continued
    )
    :\**[ \t]*(?:\n|$)?                                                       # the colon ends the preamble
    """,
    re.IGNORECASE | re.VERBOSE,
)
_POLITE_LINE = re.compile(r"^\s*(?:sure|certainly|okay|ok|of course|absolutely)[!.]?[ \t]*\n", re.IGNORECASE)
_WRAP_TAGS = re.compile(r"^\s*<(continuation|partial_answer|answer)>\s*(.*?)\s*(?:</\1>\s*)?$", re.DOTALL)
_FENCE = re.compile(r"^\s*```[\w-]*[ \t]*\n(.*?)\n?```\s*$", re.DOTALL)
_QUOTES = {'"': '"', "“": "”", "'": "'"}

#: shortest tail of the partial answer that counts as an echo when the output repeats it
ECHO_MIN_CHARS = 16


def strip_preamble(text: str) -> str:
    """Drop a leading "Here is the continuation:"-style line, a wrapping tag, code fence or quotes."""
    out = text
    if (m := _WRAP_TAGS.match(out)) is not None:
        out = m.group(2)
    if (m := _FENCE.match(out)) is not None:
        out = m.group(1)
    m = _PREAMBLE.match(out)
    if m is not None or (m := _POLITE_LINE.match(out)) is not None:
        out = out[m.end() :].lstrip()
    stripped = out.strip()
    if len(stripped) >= 2 and stripped[0] in _QUOTES and stripped.endswith(_QUOTES[stripped[0]]):
        inner = stripped[1:-1]
        if stripped[0] not in inner and _QUOTES[stripped[0]] not in inner:
            out = inner
    if out.startswith(("...", "…")):
        out = out[3:] if out.startswith("...") else out[1:]
    return out


def strip_echo(text: str, prefix: str, min_chars: int = ECHO_MIN_CHARS) -> str:
    """Drop a repetition of the partial answer (whole, or its last ``>= min_chars`` characters) from
    the start of ``text``. An overlap must begin at a word boundary of the prefix, so a continuation
    that merely starts like the prefix's last letters is kept."""
    body = prefix.strip()
    if not body:
        return text
    t = text.lstrip()
    if t.startswith(body):
        return t[len(body) :]
    if len(t) < min_chars or len(body) < min_chars:
        return text
    probe = t[:min_chars]
    best = 0
    start = body.find(probe)
    while start != -1:
        tail = body[start:]
        at_boundary = start == 0 or not (body[start - 1].isalnum() and body[start].isalnum())
        if at_boundary and t.startswith(tail):
            best = max(best, len(tail))
            break  # the first (leftmost) match is the longest tail
        start = body.find(probe, start + 1)
    return t[best:] if best else text


def instruct_postprocess(text: str, prefix: str) -> str:
    """What an instructed chat model returned, cleaned to a continuation that reads after ``prefix``:
    preamble/wrappers stripped, an echo of the partial answer stripped, then joined at the seam
    (a prefix ending in whitespace takes a continuation without leading whitespace)."""
    out = strip_echo(strip_preamble(text), prefix)
    if prefix and prefix != prefix.rstrip():
        out = out.lstrip()
    return out


__all__ = [
    "INSTRUCT_EMPTY_TEMPLATE",
    "INSTRUCT_ENDING_HINTS",
    "INSTRUCT_TEMPLATE",
    "PLAIN_COMPLETION_STOP",
    "PLAIN_COMPLETION_TEMPLATE",
    "PROTOCOLS",
    "ProtocolName",
    "completion_postprocess",
    "completion_prompt",
    "instruct_messages",
    "instruct_postprocess",
    "join_continuation",
    "prefill_messages",
    "prefill_postprocess",
    "split_trailing_whitespace",
    "strip_echo",
    "strip_preamble",
    "task_messages",
    "task_text",
    "tokenizer_adds_bos",
]

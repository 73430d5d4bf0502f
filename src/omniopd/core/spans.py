"""Aligning two tokenizations of one text into the coarsest spans where both have a token boundary.

Used by white-box OPD with a teacher of another tokenizer (``methods.opd``): the student's sampled response is
decoded, the teacher scores that text in its own tokens, and the per-token log-ratio of same-tokenizer OPD becomes
a per-span one. A span's log-ratio is log q_T(span) - log p(span), each side the sum of its tokens'
log-probabilities inside the span; summed over a response it is the sequence-level log-ratio
log q_T(text) - log p(text) exactly, because the spans partition both token sequences.

Boundaries. A token's end is the length of the decoded text up to and including it; it is a boundary only where
that decoded prefix is a prefix of the whole decoded text. A token whose bytes end inside a character (byte
fallback, a multi-byte character split over tokens) decodes a prefix with a replacement character, so it has no
boundary of its own and joins the span of the next token that has one. A token that decodes to nothing (a special
token) ends where the text before it ended and belongs to the span that ends there (the first span at position 0).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Span:
    student: tuple[int, ...]  # token indices of the student's tokenization in this span
    teacher: tuple[int, ...]  # token indices of the teacher's

    def log_ratio(self, student_logprobs: Sequence[float], teacher_logprobs: Sequence[float]) -> float:
        """log q_T(span) - log p(span)."""
        return sum(teacher_logprobs[i] for i in self.teacher) - sum(student_logprobs[i] for i in self.student)


def token_ends(decode: Callable[[list[int]], str], ids: Sequence[int]) -> tuple[str, list[int | None]]:
    """The decoded text of ``ids`` and each token's end in it (None where the decoded prefix is not a prefix of
    the text). ``decode`` maps token ids to text (special tokens dropped)."""
    text = decode(list(ids))
    ends: list[int | None] = []
    for i in range(len(ids)):
        prefix = decode(list(ids[: i + 1]))
        ends.append(len(prefix) if text.startswith(prefix) else None)
    return text, ends


def _effective(ends: Sequence[int | None], length: int) -> list[int]:
    """Each token's end, a token without a boundary taking the next token's (the text's end for the last)."""
    out: list[int] = [length] * len(ends)
    nxt = length
    for i in range(len(ends) - 1, -1, -1):
        e = ends[i]
        if e is not None:
            nxt = e
        out[i] = nxt
    return out


def common_spans(student_ends: Sequence[int | None], teacher_ends: Sequence[int | None], length: int) -> list[Span]:
    """The coarsest spans of a text of ``length`` characters whose boundaries are token boundaries of both
    tokenizations. Every token of each side is in exactly one span, in order; a side's last token must end at
    ``length`` (both tokenizations cover the whole text)."""
    s_end, t_end = _effective(student_ends, length), _effective(teacher_ends, length)
    cuts = sorted(({e for e in s_end if e > 0} & {e for e in t_end if e > 0}) | {length})
    s_groups: list[list[int]] = [[] for _ in cuts]
    t_groups: list[list[int]] = [[] for _ in cuts]
    for groups, ends in ((s_groups, s_end), (t_groups, t_end)):
        for i, e in enumerate(ends):
            groups[bisect_left(cuts, e) if e > 0 else 0].append(i)
    return [Span(tuple(s), tuple(t)) for s, t in zip(s_groups, t_groups, strict=True) if s or t]


def span_advantages(
    spans: Sequence[Span], student_logprobs: Sequence[float], teacher_logprobs: Sequence[float]
) -> list[float]:
    """Each student token's advantage: the log-ratio of the span it is in (0 for a token in no span)."""
    adv = [0.0] * len(student_logprobs)
    for span in spans:
        r = span.log_ratio(student_logprobs, teacher_logprobs)
        for i in span.student:
            adv[i] = r
    return adv

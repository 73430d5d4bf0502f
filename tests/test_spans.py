"""Cross-tokenizer spans (``core.spans``) on hand-made tokenizations, with hand-computed values."""

from __future__ import annotations

import math

import pytest

from omniopd.core.spans import Span, common_spans, span_advantages, token_ends

# two toy tokenizers over the text "abcdef": the student's tokens a|bc|d|ef, the teacher's ab|c|def
S_TOKENS = ["a", "bc", "d", "ef"]
T_TOKENS = ["ab", "c", "def"]


def _decode(vocab: list[str]):
    return lambda ids: "".join(vocab[i] for i in ids)


def test_token_ends_and_the_coarsest_common_spans():
    text, s_ends = token_ends(_decode(S_TOKENS), [0, 1, 2, 3])
    _, t_ends = token_ends(_decode(T_TOKENS), [0, 1, 2])
    assert text == "abcdef" and s_ends == [1, 3, 4, 6] and t_ends == [2, 3, 6]
    spans = common_spans(s_ends, t_ends, len(text))
    # both have a boundary at 3 and 6 only: "abc" = a+bc = ab+c, "def" = d+ef = def
    assert spans == [Span((0, 1), (0, 1)), Span((2, 3), (2,))]


def test_span_log_ratios_sum_to_the_sequence_log_ratio():
    s_lp = [math.log(0.5), math.log(0.25), math.log(0.8), math.log(0.1)]
    t_lp = [math.log(0.3), math.log(0.9), math.log(0.05)]
    spans = common_spans([1, 3, 4, 6], [2, 3, 6], 6)
    # by hand: span "abc": log(0.3 * 0.9) - log(0.5 * 0.25) = log(0.27 / 0.125); span "def": log(0.05 / 0.08)
    assert spans[0].log_ratio(s_lp, t_lp) == pytest.approx(math.log(0.27 / 0.125))
    assert spans[1].log_ratio(s_lp, t_lp) == pytest.approx(math.log(0.05 / 0.08))
    adv = span_advantages(spans, s_lp, t_lp)
    assert adv == pytest.approx([math.log(2.16)] * 2 + [math.log(0.625)] * 2)
    assert sum(s.log_ratio(s_lp, t_lp) for s in spans) == pytest.approx(sum(t_lp) - sum(s_lp))


def test_the_same_tokenizer_gives_one_span_per_token_the_per_token_advantage():
    ends = [1, 3, 4, 6]
    spans = common_spans(ends, ends, 6)
    assert spans == [Span((i,), (i,)) for i in range(4)]
    s_lp, t_lp = [-1.0, -2.0, -0.5, -3.0], [-0.7, -2.5, -0.1, -1.0]
    assert span_advantages(spans, s_lp, t_lp) == pytest.approx([t - s for s, t in zip(s_lp, t_lp)])


def test_a_token_ending_inside_a_character_joins_the_next_span():
    # "é" (2 UTF-8 bytes) split over two byte-fallback tokens on the student's side: the first decodes to "\ufffd"
    vocab = {0: b"x", 1: b"\xc3", 2: b"\xa9", 3: b"y"}

    def decode(ids):
        return b"".join(vocab[i] for i in ids).decode("utf-8", errors="replace")

    text, s_ends = token_ends(decode, [0, 1, 2, 3])
    assert text == "xéy" and s_ends == [1, None, 2, 3]
    t_ends = [2, 3]  # the teacher: "xé" | "y"
    spans = common_spans(s_ends, t_ends, len(text))
    assert spans == [Span((0, 1, 2), (0,)), Span((3,), (1,))]


def test_a_token_that_decodes_to_nothing_stays_where_it_is():
    # the student's end-of-turn token decodes to "" (a special token): it ends where the text did
    assert common_spans([2, 4, 4], [4], 4) == [Span((0, 1, 2), (0,))]
    assert common_spans([0, 2, 4], [2, 4], 4) == [Span((0, 1), (0,)), Span((2,), (1,))]  # a leading special token

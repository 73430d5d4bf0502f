"""Measures of a trained student that can tell methods apart when accuracy cannot (ALGORITHM.md
"Measuring a small student"), and their intervals. Pure functions on text, counts and numbers.

Definitions (used by ``omniopd compare`` and stated in its tables):

- **answered and stopped**: the model ended its answer itself (EOS before the length limit) and the
  last non-empty line of the answer holds ``####`` followed by a non-empty answer.
- **loop**: ``####`` appears 3 or more times, or the tail is periodic: after collapsing whitespace
  runs to one space and digit runs to ``0``, the last ``LOOP_WINDOW_CHARS`` (120) characters equal
  themselves shifted by some period p <= ``LOOP_MAX_PERIOD`` (40) characters, i.e. at least three
  copies of one string of at most 40 characters fill the tail.
- **very short**: at most 10 response tokens (EOS included).

Code benchmarks (HumanEval, MBPP+), on the code the grader extracted from each answer:

- **valid Python**: the code is non-empty and ``ast.parse`` accepts it on its own (an answer that only
  continues the HumanEval prompt's body, without the ``def`` line, does not parse on its own and
  counts as not valid).
- **defines the entry point**: the code defines the task's function at top level (``def name(``,
  ``class name`` or ``name = ...``; for code that does not parse, a ``def name(`` line).

Intervals, all 95%: a share uses the Wilson score interval; a mean (length, per-token
log-likelihood, per-token KL) uses a percentile bootstrap over problems (or rollouts), resampling
whole problems so a token-weighted mean keeps its weighting; the difference of two methods'
accuracies on the same problems uses the normal approximation for paired differences of binary
outcomes: d_i = y_i(method) - y_i(base), mean(d) +- 1.96 * sd(d) / sqrt(n) (0 +- 0 when no problem
changed its verdict).
"""

from __future__ import annotations

import re

from omniopd.evaluation.stats import Z95, paired_difference, ratio_bootstrap, share, wilson_interval  # noqa: F401 - re-exported

SHORT_TOKENS = 10
LOOP_WINDOW_CHARS = 120
LOOP_MAX_PERIOD = 40
LOOP_MARKER_COUNT = 3

_CALC = re.compile(r"<<[^<>]*>>")
_WS = re.compile(r"\s+")
_DIGITS = re.compile(r"\d+")
_HASH_LINE = re.compile(r"####\s*\S")


def clean_reference(text: str) -> str:
    """A GSM8K reference solution without its ``<<48/2=24>>`` calculator annotations."""
    return _CALC.sub("", text).strip()


def answered_and_stopped(text: str, finished: bool) -> bool:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return bool(finished and lines and _HASH_LINE.search(lines[-1]))


def loops(text: str) -> bool:
    if text.count("####") >= LOOP_MARKER_COUNT:
        return True
    norm = _DIGITS.sub("0", _WS.sub(" ", text)).strip()
    if len(norm) < LOOP_WINDOW_CHARS:
        return False
    tail = norm[-LOOP_WINDOW_CHARS:]
    return any(tail[p:] == tail[:-p] for p in range(1, LOOP_MAX_PERIOD + 1))


def is_short(tokens: int) -> bool:
    return tokens <= SHORT_TOKENS


def valid_python(code: str) -> bool:
    from omniopd.evaluation.extract import parses

    return bool(code.strip()) and parses(code)


def defines_entry_point(code: str, entry_point: str) -> bool:
    from omniopd.evaluation.extract import defines

    return bool(code.strip()) and defines(code, entry_point)

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

import math
import re
from typing import Sequence

from omniopd.evaluation.mathgrade import wilson_interval

Z95 = 1.959964
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
    from omniopd.evaluation.code import _parses

    return bool(code.strip()) and _parses(code)


def defines_entry_point(code: str, entry_point: str) -> bool:
    from omniopd.evaluation.code import _defines

    return bool(code.strip()) and _defines(code, entry_point)


def share(flags: Sequence[bool]) -> dict:
    n, k = len(flags), sum(bool(f) for f in flags)
    lo, hi = wilson_interval(k, n)
    return {"value": k / n if n else None, "lo": lo if n else None, "hi": hi if n else None, "n": n}


def ratio_bootstrap(num: Sequence[float], den: Sequence[float], *, samples: int = 2000, seed: int = 0) -> dict:
    """sum(num) / sum(den) over units, with a percentile-bootstrap 95% interval resampling units."""
    import numpy as np

    n = len(num)
    if n == 0 or sum(den) <= 0:
        return {"value": None, "lo": None, "hi": None, "n": n}
    a, b = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    value = float(a.sum() / b.sum())
    idx = np.random.default_rng(seed).integers(0, n, size=(samples, n))
    sa, sb = a[idx].sum(1), b[idx].sum(1)
    stats = sa[sb > 0] / sb[sb > 0]
    lo, hi = (float(np.quantile(stats, 0.025)), float(np.quantile(stats, 0.975))) if stats.size else (value, value)
    return {"value": value, "lo": lo, "hi": hi, "n": n}


def paired_difference(method: Sequence[bool], base: Sequence[bool]) -> dict:
    """Mean of per-problem differences of two binary outcomes, with the normal-approximation 95% interval."""
    if len(method) != len(base):
        raise ValueError(f"paired outcomes need the same problems: {len(method)} vs {len(base)}")
    n = len(method)
    if n == 0:
        return {"value": None, "lo": None, "hi": None, "n": 0}
    d = [float(m) - float(b) for m, b in zip(method, base, strict=True)]
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / (n - 1) if n > 1 else 0.0
    half = Z95 * math.sqrt(var / n)
    return {"value": mean, "lo": mean - half, "hi": mean + half, "n": n}

"""Final-answer extraction and equivalence for math benchmarks.

Extraction, in order (the first rule that finds something wins, and the rule is reported):
``#### <answer>`` (last occurrence, GSM8K style), the last ``\\boxed{...}`` (balanced braces), then
the last number in the text as a fallback. Equivalence is decided by math-verify (the grader used by
open-r1 and lighteval), so ``\\frac12`` equals ``0.5`` and ``3,000`` equals ``3000``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

_HASH = re.compile(r"####\s*([^\n]*)")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")

EXTRACTION_RULES = ("hash", "boxed", "last_number")


@dataclass(frozen=True)
class Extraction:
    answer: str | None
    rule: str | None  # which rule found it, None when unparsed


def _last_boxed(text: str) -> str | None:
    idx = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if idx < 0:
        return None
    i = text.index("{", idx) + 1
    depth, start = 1, i
    while i < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        i += 1
    return text[start : i - 1].strip() if depth == 0 else None


def _clean_number(s: str) -> str:
    return s.replace(",", "").rstrip(".")


def extract_answer(text: str, rules: tuple[str, ...] = EXTRACTION_RULES) -> Extraction:
    for rule in rules:
        if rule == "hash":
            found = _HASH.findall(text)
            if found and found[-1].strip():
                val = found[-1].strip().strip("$ ").rstrip(".")
                nums = _NUMBER.findall(val)
                # "#### 42 apples" -> 42; keep non-numeric answers (fractions, expressions) as written
                return Extraction(_clean_number(nums[0]) if nums and not re.search(r"[\\/^]", val) else val, rule)
        elif rule == "boxed":
            boxed = _last_boxed(text)
            if boxed:
                return Extraction(boxed, rule)
        elif rule == "last_number":
            nums = _NUMBER.findall(text)
            if nums:
                return Extraction(_clean_number(nums[-1]), rule)
        else:
            raise ValueError(f"unknown extraction rule {rule!r}; known: {EXTRACTION_RULES}")
    return Extraction(None, None)


def answers_match(gold: str, predicted: str | None) -> bool:
    """math-verify equivalence of a predicted final answer with the gold answer."""
    if predicted is None or not predicted.strip():
        return False
    from math_verify import parse, verify

    def _parse(s: str):
        s = s.strip()
        wrapped = s if s.startswith("$") else f"${s}$"
        return parse(wrapped) or parse(s)

    try:
        gold_p, pred_p = _parse(_clean_number(gold) if _NUMBER.fullmatch(gold.strip()) else gold), _parse(predicted)
        if not gold_p or not pred_p:
            return gold.strip() == predicted.strip()
        return bool(verify(gold_p, pred_p))
    except Exception:  # noqa: BLE001 - a grader crash on odd model text is a wrong answer, not a crash
        return gold.strip() == predicted.strip()


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval for a proportion (well-behaved at 0 and 1, unlike the normal interval)."""
    if n == 0:
        return (0.0, 0.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))

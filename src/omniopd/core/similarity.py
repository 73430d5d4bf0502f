"""phi: similarity of the student's chunk to one teacher continuation, in [0, 1] (ALGORITHM.md step 5).

- ``ned``: normalized character edit similarity 1 - Levenshtein(a, b) / max(len a, len b), computed
  with rapidfuzz (uniform weights, so its normalized similarity is exactly this formula). Both texts
  are cut to 4000 characters first; both empty -> 1, exactly one empty -> 0.
- ``rouge1``: ROUGE-1 F1 over unigrams, tokenized like the reference ``rouge_score`` package without
  stemming (lower-case, every run of characters outside [a-z0-9] is a separator). Both empty -> 1,
  one empty -> 0.

k_sem(c) = sum_i phi(student_chunk, teacher_continuation_i). The embedding phi of issue 3/6 lives in
``omniopd.methods.omniopd.phi`` because it needs a model; it registers under the same interface.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Callable, Sequence

from rapidfuzz.distance import Levenshtein

MAX_CHARS = 4000

Phi = Callable[[str, str], float]


def ned(a: str, b: str) -> float:
    """1 - Levenshtein(a, b) / max(len a, len b) on texts cut to 4000 characters."""
    a, b = a[:MAX_CHARS], b[:MAX_CHARS]
    if not a and not b:
        return 1.0
    if not a or not b:
        return 0.0
    return float(Levenshtein.normalized_similarity(a, b))


_TOKEN = re.compile(r"[a-z0-9]+")


def _unigrams(text: str) -> Counter[str]:
    return Counter(_TOKEN.findall(text[:MAX_CHARS].lower()))


def rouge1(a: str, b: str) -> float:
    """ROUGE-1 F1 between the unigram bags of ``a`` and ``b``."""
    ua, ub = _unigrams(a), _unigrams(b)
    if not ua and not ub:
        return 1.0
    if not ua or not ub:
        return 0.0
    overlap = sum((ua & ub).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / sum(ub.values()), overlap / sum(ua.values())
    return 2 * precision * recall / (precision + recall)


PHI_FUNCTIONS: dict[str, Phi] = {"ned": ned, "rouge1": rouge1}


def k_sem(student_chunk: str, continuations: Sequence[str], phi: Phi) -> tuple[float, list[float]]:
    """k_sem = sum_i phi(student_chunk, continuation_i), and the per-continuation scores."""
    scores = [float(phi(student_chunk, c)) for c in continuations]
    for s in scores:
        if not 0.0 <= s <= 1.0:
            raise RuntimeError(f"phi returned {s}, outside [0, 1]")
    return sum(scores), scores

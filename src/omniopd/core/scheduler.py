"""Anchor selection: where in a response the teacher audits (ALGORITHM.md step 3).

``select_peak_entropy`` is the paper's scheduler. Candidate chunk starts are response positions t
with t + C <= T (T = the response's real length, EOS included), scored by H_t, the entropy of the
distribution that produced token y_t. Greedy: take the highest score (ties go to the later
position), skip any candidate closer than C tokens to an accepted start (so chunks never overlap),
stop at M. Fewer than M may fit; a response shorter than C gets none.

``select_random`` and ``select_uniform`` are the ablations ("without entropy selection"): the same
non-overlap and length rules, different placement.
"""

from __future__ import annotations

import random
from typing import Callable, Sequence


def _non_overlapping(order: Sequence[int], chunk_tokens: int, num_chunks: int) -> list[int]:
    chosen: list[int] = []
    for t in order:
        if len(chosen) >= num_chunks:
            break
        if all(abs(t - a) >= chunk_tokens for a in chosen):
            chosen.append(t)
    return sorted(chosen)


def _check(length: int, chunk_tokens: int, num_chunks: int) -> None:
    if chunk_tokens <= 0 or num_chunks < 0 or length < 0:
        raise ValueError(f"bad scheduler arguments: length={length} C={chunk_tokens} M={num_chunks}")


def select_peak_entropy(
    entropy: Sequence[float], length: int, chunk_tokens: int, num_chunks: int, rng: random.Random | None = None
) -> list[int]:
    """Start positions (ascending) of up to ``num_chunks`` non-overlapping chunks at peak entropy.

    ``entropy[t]`` is H_t for response token t; only the first ``length`` entries are real.
    """
    _check(length, chunk_tokens, num_chunks)
    candidates = range(0, length - chunk_tokens + 1)  # empty when length < C
    order = sorted(candidates, key=lambda t: (float(entropy[t]), t), reverse=True)  # ties -> later t
    return _non_overlapping(order, chunk_tokens, num_chunks)


def select_random(
    entropy: Sequence[float], length: int, chunk_tokens: int, num_chunks: int, rng: random.Random | None = None
) -> list[int]:
    """Ablation: greedy non-overlapping chunks at uniformly random candidate starts."""
    _check(length, chunk_tokens, num_chunks)
    order = list(range(0, length - chunk_tokens + 1))
    (rng or random.Random(0)).shuffle(order)
    return _non_overlapping(order, chunk_tokens, num_chunks)


def select_uniform(
    entropy: Sequence[float], length: int, chunk_tokens: int, num_chunks: int, rng: random.Random | None = None
) -> list[int]:
    """Ablation: up to M chunks spread evenly over the response (as many as fit without overlap)."""
    _check(length, chunk_tokens, num_chunks)
    fit = min(num_chunks, length // chunk_tokens)
    if fit == 0:
        return []
    span = length - chunk_tokens  # last legal start
    if fit == 1:
        return [span // 2]
    return [round(i * span / (fit - 1)) for i in range(fit)]


AnchorSelector = Callable[..., list[int]]
ANCHOR_SELECTORS: dict[str, AnchorSelector] = {
    "peak_entropy": select_peak_entropy,
    "random": select_random,
    "uniform": select_uniform,
}

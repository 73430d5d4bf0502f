"""Data parallelism helpers: which prompts a rank trains on, and how per-rank metrics become one line.

With P processes each step's global prompt batch (``optim.prompts_per_step``) is cut into P equal
slices; rank r samples, audits and back-propagates its slice, and the gradients are averaged by the
DDP all-reduce. Every loss is a sum over tokens divided by the rank's number of trajectories, so the
average over ranks equals the one-process loss of the whole batch.

Metrics are combined by :func:`combine_metrics` from every rank's dict (a rank that audited nothing
simply lacks the audit keys; the combined line has the union of keys): counts are summed, times and
maxima take the maximum, minima the minimum, everything else is the mean over the ranks that report it
(per-chunk ``audit/*`` statistics weighted by each rank's number of chunks).
"""

from __future__ import annotations

import math

# per-rank counts whose global value is their sum
SUM_KEYS = {
    "audit/chunks",
    "audit/skipped_short",
    "teacher/tokens",
    "teacher/tokens_in",
    "teacher/tokens_out",
    "teacher/requests",
    "teacher/failed_chunks",
    "rollout/trajectories",
    "tokens/response",
    "tokens/target",
    "sft/target_tokens",
    "teacher/cached_tokens",
    "teacher/cache_write_tokens",
    "teacher/cost_usd",
}


def combine_metrics(per_rank: list[dict[str, float]]) -> dict[str, float]:
    if len(per_rank) == 1:
        return dict(per_rank[0])
    keys = list(dict.fromkeys(k for m in per_rank for k in m))
    out: dict[str, float] = {}
    for key in keys:
        values = [float(m[key]) for m in per_rank if key in m and isinstance(m[key], (int, float))]
        if not values:
            continue
        if key in SUM_KEYS or key.startswith("teacher/total_"):
            out[key] = sum(values)
        elif key.startswith("time/") or key.endswith(("_max", "/max_length")):
            out[key] = max(values)
        elif key.endswith("_min"):
            out[key] = min(values)
        else:
            # per-chunk statistics are weighted by each rank's number of chunks (percentiles become the
            # chunk-weighted mean of the ranks' percentiles, an approximation); the rest by rank
            pairs = [
                (float(m[key]), float(m.get("audit/chunks", 1.0)) if key.startswith("audit/") else 1.0)
                for m in per_rank
                if key in m and isinstance(m[key], (int, float)) and math.isfinite(m[key])
            ]
            total = sum(w for _, w in pairs)
            if total <= 0:  # e.g. no rank audited a chunk: plain mean
                pairs, total = [(v, 1.0) for v, _ in pairs], float(len(pairs))
            if pairs:
                out[key] = sum(v * w for v, w in pairs) / total
    return out


def rank_slice(items: list, rank: int, world: int) -> list:
    """Rank ``rank``'s contiguous share of ``items`` (their number must divide by ``world``)."""
    per = len(items) // world
    return items[rank * per : (rank + 1) * per]

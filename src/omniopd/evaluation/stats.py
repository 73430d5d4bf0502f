"""The statistics every report uses: intervals, bootstraps, correlations, quantiles, pass@k, and the
one rule for deriving seeds. Pure functions of their inputs (numpy only for the bootstrap)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence

Z95 = 1.959964  # two-sided 95% normal quantile
SEED_PRIME = 1_000_003
SEED_MODULUS = 2**31 - 1


def mix_seed(seed: int, index: int, *, bounded: bool = False) -> int:
    """A seed derived from ``seed`` for stream ``index`` (a step, a sample, a round):
    ``seed * 1_000_003 + index``, reduced modulo 2**31 - 1 when ``bounded`` (for APIs that take 31 bits)."""
    mixed = seed * SEED_PRIME + index
    return mixed % SEED_MODULUS if bounded else mixed


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval for a proportion (well-behaved at 0 and 1, unlike the normal interval)."""
    if n == 0:
        return (0.0, 0.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def share(flags: Sequence[bool]) -> dict:
    """The share of true flags with its Wilson interval (None values when there are no flags)."""
    n, k = len(flags), sum(bool(f) for f in flags)
    lo, hi = wilson_interval(k, n)
    return {"value": k / n if n else None, "lo": lo if n else None, "hi": hi if n else None, "n": n}


def mean_ci(values: list[float]) -> list[float]:
    """Normal-approximation 95% interval of a mean ([m, m] for one value, [0, 0] for none)."""
    if not values:
        return [0.0, 0.0]
    m = statistics.fmean(values)
    if len(values) < 2:
        return [m, m]
    half = Z95 * statistics.stdev(values) / math.sqrt(len(values))
    return [m - half, m + half]


def mean_se(xs: list[float]) -> tuple[float | None, float | None]:
    """Mean and standard error (sd / sqrt(n)); None where undefined."""
    if not xs:
        return None, None
    m = statistics.mean(xs)
    if len(xs) < 2:
        return m, None
    var = sum((x - m) ** 2 for x in xs) / (len(xs) - 1)
    return m, math.sqrt(var / len(xs))


def pearson(a: list[float], b: list[float]) -> float | None:
    """Pearson correlation; None for fewer than 3 pairs or a constant side."""
    if len(a) < 3:
        return None
    ma, mb = statistics.mean(a), statistics.mean(b)
    sa = math.sqrt(sum((x - ma) ** 2 for x in a))
    sb = math.sqrt(sum((y - mb) ** 2 for y in b))
    if sa == 0 or sb == 0:
        return None
    return sum((x - ma) * (y - mb) for x, y in zip(a, b, strict=True)) / (sa * sb)


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
    ratios = sa[sb > 0] / sb[sb > 0]
    lo, hi = (float(np.quantile(ratios, 0.025)), float(np.quantile(ratios, 0.975))) if ratios.size else (value, value)
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


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile ``q`` of already sorted values (0.0 for none)."""
    if not sorted_values:
        return 0.0
    pos = (len(sorted_values) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem from ``n`` samples of which ``c`` passed (Chen et al., 2021):
    ``1 - C(n-c, k) / C(n, k)``, computed as ``1 - prod_{i=n-c+1..n} (1 - k/i)``."""
    for name, value in (("n", n), ("c", c), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {value!r}")
    if n < 1 or k < 1:
        raise ValueError(f"need n >= 1 and k >= 1, got n={n}, k={k}")
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got c={c}, n={n}")
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got n={n}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def mean_pass_at_k(counts: Iterable[tuple[int, int]], k: int) -> float:
    """Mean pass@k over problems given as ``(n, c)`` pairs."""
    values = [pass_at_k(n, c, k) for n, c in counts]
    if not values:
        raise ValueError("no problems")
    return sum(values) / len(values)

"""The Dirichlet-Multinomial target (ALGORITHM.md step 6).

pi_hat(c) = (k_sem(c) + alpha * p_bar(c)) / (N + alpha), with p_bar(c) = exp(mean_{t in c} log p(y_t)),
the student's geometric-mean chunk probability used as the prior mean. alpha (``prior_strength``)
is the pseudo-count of the prior: alpha = 0 gives the raw agreement rate k_sem / N, alpha -> inf
gives p_bar. The target is a constant multiplier in the loss, so it is always returned detached.

``centered_targets`` is a departure (ALGORITHM.md "Departures we test"): pi_hat minus the batch mean.

The second part holds the stopping rule of adaptive N (a departure, ``audit.adaptive_n``): the central
95% interval of the chunk's Beta posterior, computed exactly (see below).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor


def chunk_prior_mean(chunk_logprobs: Tensor) -> Tensor:
    """p_bar = exp(mean log p) over the last axis, (..., C) -> (...), detached."""
    return chunk_logprobs.detach().float().mean(-1).exp()


def dm_target(k_sem: Tensor, prior_mean: Tensor, num_samples: int | Tensor, prior_strength: float) -> Tensor:
    """pi_hat = (k_sem + alpha * p_bar) / (N + alpha), detached and checked to lie in [0, 1].

    ``num_samples`` is N for every chunk, or a tensor of one n per chunk (adaptive N, where a chunk that
    settled early is scored on its own n continuations)."""
    if isinstance(num_samples, Tensor):
        n = num_samples.detach().float()
        if n.numel() and n.min() < 1:
            raise ValueError(f"num_samples must be >= 1, got min {n.min().item()}")
        denom: float | Tensor = n + prior_strength
    else:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        denom = num_samples + prior_strength
    if prior_strength < 0:
        raise ValueError(f"prior_strength must be >= 0, got {prior_strength}")
    k = k_sem.detach().float()
    p = prior_mean.detach().float()
    target = (k + prior_strength * p) / denom
    # k_sem in [0, N] and p_bar in [0, 1] make this a convex combination; anything else is a bug upstream.
    eps = 1e-6
    if target.numel() and (target.min() < -eps or target.max() > 1 + eps or not torch.isfinite(target).all()):
        raise RuntimeError(f"target outside [0, 1]: min={target.min().item()} max={target.max().item()}")
    return target.clamp(0.0, 1.0)


# --- adaptive N (a labelled departure, ``audit.adaptive_n``; off by default) ---------------------------
#
# With n continuations seen and k = sum of phi so far, the chunk's agreement rate has the posterior
# Beta(k + alpha * p_bar, n - k + alpha * (1 - p_bar)): the Beta prior with mean p_bar and pseudo-count
# alpha that ``dm_target`` uses, updated with k "agreements" out of n. The posterior mean is exactly
# pi_hat = (k + alpha * p_bar) / (n + alpha). A chunk stops being sampled once the central 95% interval of
# that posterior is narrower than ``adaptive_width``, or once n reaches N.
#
# The interval is computed exactly (no normal approximation, which gives widths above 1 for flat
# posteriors): the regularized incomplete beta I_x(a, b) by its continued fraction (modified Lentz,
# the Numerical Recipes ``betacf`` recurrence, in float64 with ``math.lgamma``), inverted by bisection.
# Pure Python on scalars: a step asks for a few dozen intervals, so speed does not matter.

_BETACF_MAX_ITER = 500
_BETACF_EPS = 1e-15
_TINY = 1e-300


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of I_x(a, b) (converges fast for x < (a + 1) / (a + b + 2))."""
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    h = d
    for m in range(1, _BETACF_MAX_ITER + 1):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > _TINY else _TINY)
        c = 1.0 + aa / c
        c = c if abs(c) > _TINY else _TINY
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > _TINY else _TINY)
        c = 1.0 + aa / c
        c = c if abs(c) > _TINY else _TINY
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < _BETACF_EPS:
            break
    return h


def beta_cdf(x: float, a: float, b: float) -> float:
    """The regularized incomplete beta I_x(a, b) = P(X <= x) for X ~ Beta(a, b), a, b > 0."""
    if a <= 0 or b <= 0:
        raise ValueError(f"Beta parameters must be > 0, got a={a}, b={b}")
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def beta_quantile(q: float, a: float, b: float, tol: float = 1e-12) -> float:
    """The x with I_x(a, b) = q, by bisection on [0, 1] (the CDF is continuous and increasing)."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must lie in [0, 1], got {q}")
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if beta_cdf(mid, a, b) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo < tol:
            break
    return 0.5 * (lo + hi)


def beta_interval_width(a: float, b: float, mass: float = 0.95) -> float:
    """Width of the central ``mass`` interval of Beta(a, b). A parameter <= 0 (an improper posterior, e.g.
    p_bar that underflowed to 0 with k = 0) is read as its limit, a point mass: width 0."""
    if not 0.0 < mass < 1.0:
        raise ValueError(f"mass must lie in (0, 1), got {mass}")
    if a <= 0 or b <= 0:
        return 0.0
    tail = (1.0 - mass) / 2.0
    return beta_quantile(1.0 - tail, a, b) - beta_quantile(tail, a, b)


def posterior_width(k: float, n: int, prior_mean: float, prior_strength: float, mass: float = 0.95) -> float:
    """Central ``mass`` interval width of the chunk's posterior Beta(k + alpha p_bar, n - k + alpha (1 - p_bar))."""
    if n < 0 or not -1e-6 <= k <= n + 1e-6:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    k = min(max(k, 0.0), float(n))
    a = k + prior_strength * prior_mean
    b = n - k + prior_strength * (1.0 - prior_mean)
    return beta_interval_width(a, b, mass)


def posterior_settled(
    k: float, n: int, prior_mean: float, prior_strength: float, *, max_samples: int, width: float, mass: float = 0.95
) -> bool:
    """Stop sampling a chunk: n reached N (``max_samples``), or its posterior interval is narrower than ``width``."""
    if n >= max_samples:
        return True
    return posterior_width(k, n, prior_mean, prior_strength, mass) < width


def centered_targets(targets: Sequence[float] | Tensor) -> Tensor:
    """pi_hat - mean(pi_hat) over the batch's chunks, flat (num_chunks,), detached.

    Departure ("Centred target", ALGORITHM.md "Departures we test"; off by default, label the run):
    the weight becomes a chunk-level advantage that can be negative, so chunks the teacher agrees with
    less than average are pushed down instead of everything being sharpened. A single chunk (or none)
    carries no relative signal and gives zeros (or an empty tensor), never NaN from an empty mean.
    """
    t = torch.as_tensor(targets, dtype=torch.float32).detach().reshape(-1)
    if t.numel() <= 1:
        return torch.zeros_like(t)
    return t - t.mean()

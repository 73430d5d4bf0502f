"""The Dirichlet-Multinomial target (ALGORITHM.md step 6).

pi_hat(c) = (k_sem(c) + alpha * p_bar(c)) / (N + alpha), with p_bar(c) = exp(mean_{t in c} log p(y_t)),
the student's geometric-mean chunk probability used as the prior mean. alpha (``prior_strength``)
is the pseudo-count of the prior: alpha = 0 gives the raw agreement rate k_sem / N, alpha -> inf
gives p_bar. The target is a constant multiplier in the loss, so it is always returned detached.
"""

from __future__ import annotations

import torch
from torch import Tensor


def chunk_prior_mean(chunk_logprobs: Tensor) -> Tensor:
    """p_bar = exp(mean log p) over the last axis, (..., C) -> (...), detached."""
    return chunk_logprobs.detach().float().mean(-1).exp()


def dm_target(k_sem: Tensor, prior_mean: Tensor, num_samples: int, prior_strength: float) -> Tensor:
    """pi_hat = (k_sem + alpha * p_bar) / (N + alpha), detached and checked to lie in [0, 1]."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if prior_strength < 0:
        raise ValueError(f"prior_strength must be >= 0, got {prior_strength}")
    k = k_sem.detach().float()
    p = prior_mean.detach().float()
    target = (k + prior_strength * p) / (num_samples + prior_strength)
    # k_sem in [0, N] and p_bar in [0, 1] make this a convex combination; anything else is a bug upstream.
    eps = 1e-6
    if target.numel() and (target.min() < -eps or target.max() > 1 + eps or not torch.isfinite(target).all()):
        raise RuntimeError(f"target outside [0, 1]: min={target.min().item()} max={target.max().item()}")
    return target.clamp(0.0, 1.0)

"""Advantages: how much better than its alternatives a sampled sequence or token did (detached weights).

- GRPO (``group_advantages``): reward minus the group mean, optionally over the group's unbiased std
  (DeepSeekMath). A group whose rewards are all equal carries no signal and gets exactly 0.
- White-box OPD across tokenizers (``core.spans.span_advantages``): each aligned span's log-ratio.
"""

from __future__ import annotations

import torch
from torch import Tensor


def group_advantages(rewards: Tensor, group_size: int, *, normalize_std: bool = True, eps: float = 1e-6) -> Tensor:
    """(G_total,) rewards, groups of ``group_size`` consecutive samples -> (G_total,) advantages.

    A_i = r_i - mean(group), divided by (std(group) + eps) when ``normalize_std`` (unbiased std, as in
    DeepSeekMath). A group whose rewards are all equal carries no signal and gets exactly 0, not a
    rounding residue of the mean. A group of one sample also gets 0.
    """
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    r = torch.as_tensor(rewards).detach()
    r = r if r.is_floating_point() else r.float()
    if r.dim() != 1 or r.numel() % group_size:
        raise ValueError(
            f"rewards must be 1-D with a length divisible by group_size={group_size}, got {tuple(r.shape)}"
        )
    r_G = r.view(-1, group_size)  # (groups, group_size)
    adv = r_G - r_G.mean(-1, keepdim=True)
    if normalize_std and group_size > 1:
        adv = adv / (r_G.std(-1, keepdim=True) + eps)
    flat = (r_G == r_G[:, :1]).all(-1, keepdim=True)  # also true for group_size == 1
    return torch.where(flat, torch.zeros_like(adv), adv).view(-1)

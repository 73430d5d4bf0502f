"""Losses (ALGORITHM.md step 7-8). Pure functions: typed inputs in, ``(loss, metrics)`` out.

OmniOPD:  L = - sum_c pi_hat(c) sum_{t in c} log p(y_t)  +  beta * sum_{t unaudited} KL(p_ref || p)_t,
summed over tokens and divided by a constant ``normalizer`` (the number of sequences in the
optimizer step, across accumulation), never by a batch-varying token count, so the audited fraction
does not change the effective learning rate. pi_hat is applied as a detached weight: this is a
weighted likelihood, backpropagated directly, not a policy-gradient reward.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor


@dataclass
class OmniOPDLossInputs:
    student_logprobs: Tensor  # (B, T) log p_theta(y_t), with grad
    kl_ref_to_student: Tensor  # (B, T) KL(p_ref || p_theta) per position, grad through the student side
    response_mask: Tensor  # (B, T) bool, real response tokens (EOS included, padding excluded)
    chunk_weights: Tensor  # (B, T) pi_hat of the chunk covering t, 0 outside chunks, detached
    chunk_mask: Tensor  # (B, T) bool, token t lies in an audited chunk


@dataclass
class LossOutput:
    loss: Tensor  # scalar
    metrics: dict[str, float] = field(default_factory=dict)


def token_weights_from_chunks(
    starts_B: Sequence[Sequence[int]], targets_B: Sequence[Sequence[float]], chunk_tokens: int, length: int
) -> tuple[Tensor, Tensor]:
    """Spread per-chunk targets onto tokens: (B, T) weights and (B, T) chunk mask."""
    B = len(starts_B)
    weights = torch.zeros(B, length)
    mask = torch.zeros(B, length, dtype=torch.bool)
    for b, (starts, targets) in enumerate(zip(starts_B, targets_B, strict=True)):
        for s, w in zip(starts, targets, strict=True):
            if s < 0 or s + chunk_tokens > length:
                raise ValueError(f"chunk [{s}, {s + chunk_tokens}) runs outside a response of {length} tokens")
            if mask[b, s : s + chunk_tokens].any():
                raise ValueError(f"chunk at {s} overlaps another chunk")
            weights[b, s : s + chunk_tokens] = float(w)
            mask[b, s : s + chunk_tokens] = True
    return weights, mask


def omniopd_loss(inputs: OmniOPDLossInputs, kl_anchor_coef: float, normalizer: float) -> LossOutput:
    """The OmniOPD loss for one micro-batch, divided by the constant ``normalizer``."""
    if normalizer <= 0:
        raise ValueError(f"normalizer must be > 0, got {normalizer}")
    valid = inputs.response_mask.bool()
    audited = inputs.chunk_mask.bool() & valid
    unaudited = valid & ~audited
    w = inputs.chunk_weights.detach().to(inputs.student_logprobs.dtype)
    zero = inputs.student_logprobs.new_zeros(())
    # torch.where, not multiplication by a mask: a -inf log-prob on a padded position must not make NaN.
    chunk_term = -torch.where(audited, w * inputs.student_logprobs, zero).sum()
    kl_sum = torch.where(unaudited, inputs.kl_ref_to_student, zero).sum()
    loss = (chunk_term + kl_anchor_coef * kl_sum) / normalizer
    n_unaudited = max(int(unaudited.sum()), 1)
    metrics = {
        "loss/chunk": float(chunk_term.detach()) / normalizer,
        "loss/kl_anchor": float(kl_sum.detach()) / n_unaudited,  # per unaudited token, without beta
        "loss/kl_anchor_sum": float(kl_sum.detach()) / normalizer,
        "loss/total": float(loss.detach()),
        "tokens/audited": float(audited.sum()),
        "tokens/unaudited": float(unaudited.sum()),
    }
    return LossOutput(loss=loss, metrics=metrics)

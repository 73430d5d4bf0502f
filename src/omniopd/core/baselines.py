"""Baseline losses (ALGORITHM.md "Baselines") and the centred-target departure, as pure functions.

Same conventions as ``core/losses.py``: typed inputs in, ``LossOutput(loss, metrics)`` out; position t
of a (B, T) tensor belongs to response token t (``core/token_stats.py`` does the shift); padding is
removed with ``torch.where``, never by multiplying by a mask, so a -inf log-prob on a padded position
cannot make NaN; and every loss is a sum over tokens divided by a constant ``normalizer`` (the number
of sequences in the optimizer step, across accumulation), never by a batch-varying token count.

- **SFT**: negative log-likelihood of the target (teacher-written or reference) solution tokens,
  prompt tokens masked. ``token_mean=True`` divides by the micro-batch's target-token count instead:
  the Hugging Face causal-LM convention, offered for comparison with HF trainers. It is the one
  departure from the constant normalizer, and it makes long targets count less per token.
- **OPD** (white-box, same tokenizer), two estimators of the per-position reverse KL(p_theta || q_T):
  * sampled (Thinking Machines / Tinker): a detached per-token advantage
    A_t = log q_T(y_t) - log p_theta(y_t) and the surrogate -sum_t A_t log p_theta(y_t). For y_t ~ p
    with the prefix held fixed, E[-A ∇log p(y)] = sum_y p (log p - log q) ∇log p
    = sum_y ∇p (log p - log q) = ∇KL(p || q) - sum_y p ∇log p = ∇KL(p || q), since sum_y p ∇log p
    = ∇ sum_y p = 0. The gradient is per position: it gives no credit to earlier tokens for the
    states they lead to (Tinker's discount 0), which is what "reverse KL summed over positions" means
    here; the sequence-level KL would add those future terms.
  * full (GKD style): the exact full-vocabulary reverse KL per position, from hidden states in
    checkpointed slices (``reverse_kl_sliced``, the same approach as ``token_stats`` for the forward
    KL: fp32, no (B, T, V) tensor, no gradient into the teacher).
- **GRPO**: group-relative advantages (reward minus group mean, optionally over the group's unbiased
  std as in DeepSeekMath) and the PPO-clipped surrogate. Departure from the GRPO paper: tokens are
  summed and divided by the constant normalizer instead of averaged per sequence (1/|o_i|), the same
  aggregation as every other loss here (and as Dr. GRPO), so response length does not rescale the
  per-token learning rate. An optional KL to the reference is added with ``kl_coef`` (off by default).
- **Centred target** (ALGORITHM.md "Departures we test", off by default, always labelled): pi_hat
  minus the mean pi_hat of the batch's chunks, a chunk-level advantage in place of the paper's
  always-positive target.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from omniopd.core.losses import LossOutput
from omniopd.core.token_stats import Head


def _check_normalizer(normalizer: float) -> None:
    if normalizer <= 0:
        raise ValueError(f"normalizer must be > 0, got {normalizer}")


# ---------------------------------------------------------------- SFT


@dataclass
class SFTLossInputs:
    student_logprobs: Tensor  # (B, T) log p_theta(y_t) of the target tokens, with grad
    target_mask: Tensor  # (B, T) bool, target-solution tokens (prompt and padding excluded)


def sft_loss(inputs: SFTLossInputs, normalizer: float, *, token_mean: bool = False) -> LossOutput:
    """NLL of the target tokens, summed and divided by ``normalizer``.

    ``token_mean=True`` divides by this micro-batch's number of target tokens instead (``normalizer``
    is then unused): Hugging Face's ``model(input_ids, labels=labels).loss`` for one batch.
    """
    _check_normalizer(normalizer)
    mask = inputs.target_mask.bool()
    zero = inputs.student_logprobs.new_zeros(())
    nll_sum = -torch.where(mask, inputs.student_logprobs, zero).sum()
    n_target = int(mask.sum())
    denom = float(max(n_target, 1)) if token_mean else normalizer  # all-masked: 0 / 1, not 0 / 0
    loss = nll_sum / denom
    metrics = {
        "loss/sft": float(loss.detach()),
        "sft/nll_per_token": float(nll_sum.detach()) / max(n_target, 1),
        "tokens/target": float(n_target),
    }
    return LossOutput(loss=loss, metrics=metrics)


# ---------------------------------------------------------------- OPD


@dataclass
class OPDSampledInputs:
    student_logprobs: Tensor  # (B, T) log p_theta(y_t) of the student's own samples, with grad
    teacher_logprobs: Tensor  # (B, T) log q_T(y_t) of the same tokens, no grad (detached here anyway)
    response_mask: Tensor  # (B, T) bool, real response tokens (EOS included, padding excluded)


@dataclass
class OPDFullInputs:
    reverse_kl: Tensor  # (B, T) KL(p_theta || q_T) per position, grad through the student side
    response_mask: Tensor  # (B, T) bool, real response tokens


def opd_sampled_loss(inputs: OPDSampledInputs, normalizer: float) -> LossOutput:
    """Tinker-style OPD: -sum_t A_t log p(y_t) / normalizer with A_t = log q_T(y_t) - log p(y_t), detached."""
    _check_normalizer(normalizer)
    valid = inputs.response_mask.bool()
    logp = inputs.student_logprobs
    zero = logp.new_zeros(())
    # Padding may hold -inf on either side; zero the advantage there before it meets a multiplication.
    adv = torch.where(valid, inputs.teacher_logprobs.detach().to(logp.dtype) - logp.detach(), zero)
    loss = -torch.where(valid, adv * logp, zero).sum() / normalizer
    n_tok = max(int(valid.sum()), 1)
    metrics = {
        "loss/opd": float(loss.detach()),
        # mean of log p - log q over sampled tokens: the single-sample (k1) estimate of the reverse KL
        "opd/reverse_kl_mean": float(-adv.sum()) / n_tok,
        "tokens/response": float(valid.sum()),
    }
    return LossOutput(loss=loss, metrics=metrics)


def opd_full_loss(inputs: OPDFullInputs, normalizer: float) -> LossOutput:
    """GKD-style OPD: sum_t KL(p_theta || q_T)_t over real tokens / normalizer (exact, full vocabulary)."""
    _check_normalizer(normalizer)
    valid = inputs.response_mask.bool()
    kl_sum = torch.where(valid, inputs.reverse_kl, inputs.reverse_kl.new_zeros(())).sum()
    loss = kl_sum / normalizer
    metrics = {
        "loss/opd": float(loss.detach()),
        "opd/reverse_kl_mean": float(kl_sum.detach()) / max(int(valid.sum()), 1),  # per token
        "tokens/response": float(valid.sum()),
    }
    return LossOutput(loss=loss, metrics=metrics)


def _slice_reverse_kl(
    hidden: Tensor,  # (B, S, D) student
    teacher_hidden: Tensor,  # (B, S, D_T) teacher, no grad
    head: Head,
    teacher_head: Head,
) -> Tensor:
    logp = F.log_softmax(head(hidden).float(), dim=-1)  # (B, S, V) fp32
    with torch.no_grad():  # the teacher is frozen: no gradient reaches it
        logq = F.log_softmax(teacher_head(teacher_hidden).float(), dim=-1)  # (B, S, V) fp32
    if logq.shape[-1] != logp.shape[-1]:
        raise ValueError(
            f"teacher vocabulary {logq.shape[-1]} != student vocabulary {logp.shape[-1]}: "
            "white-box OPD needs the same tokenizer and an unpadded, identical head size"
        )
    # KL(p || q) = sum_v p (log p - log q): the expectation is under the student, so the gradient
    # flows through both p and log p (unlike the anchor KL, whose expectation is under the reference).
    return (logp.exp() * (logp - logq)).sum(-1)  # (B, S)


def reverse_kl_sliced(
    hidden: Tensor,  # (B, T, D) student hidden states, [:, t] produced response token t
    head: Head,
    teacher_hidden: Tensor,  # (B, T, D_T) teacher hidden states, aligned the same way
    teacher_head: Head,
    *,
    slice_size: int = 128,
    use_checkpoint: bool = True,
) -> Tensor:
    """Per-position KL(p_student || q_teacher) in nats, (B, T), ``slice_size`` positions at a time.

    Same slicing and activation checkpointing as ``token_stats``: logits exist for one slice at a time
    and are recomputed in the backward, so no (B, T, V) tensor is held; fp32 softmax.
    """
    if slice_size <= 0:
        raise ValueError(f"slice_size must be > 0, got {slice_size}")
    if hidden.shape[:2] != teacher_hidden.shape[:2]:
        raise ValueError(
            f"student {tuple(hidden.shape[:2])} and teacher {tuple(teacher_hidden.shape[:2])} positions differ"
        )
    T = hidden.shape[1]
    kls = []
    for s in range(0, T, slice_size):
        e = min(T, s + slice_size)
        args = (hidden[:, s:e], teacher_hidden[:, s:e])
        if use_checkpoint and torch.is_grad_enabled() and hidden.requires_grad:
            kls.append(checkpoint(_slice_reverse_kl, *args, head, teacher_head, use_reentrant=False))
        else:
            kls.append(_slice_reverse_kl(*args, head, teacher_head))
    if not kls:  # T == 0
        return hidden.new_zeros(hidden.shape[0], 0, dtype=torch.float32)
    return torch.cat(kls, dim=1)


# ---------------------------------------------------------------- GRPO


@dataclass
class GRPOInputs:
    student_logprobs: Tensor  # (B, T) log p_theta(y_t), with grad
    old_logprobs: Tensor  # (B, T) log p_old(y_t) from the sampling policy, no grad
    advantages: Tensor  # (B,) one group-relative advantage per sequence, no grad
    response_mask: Tensor  # (B, T) bool, real response tokens
    ref_kl: Tensor | None = None  # (B, T) per-token KL to the reference, grad through the student side


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


def grpo_loss(inputs: GRPOInputs, normalizer: float, *, clip_eps: float = 0.2, kl_coef: float = 0.0) -> LossOutput:
    """PPO-clipped GRPO surrogate, summed over real tokens / normalizer, plus kl_coef * sum ref_kl / normalizer.

    Per token: -min(r A, clip(r, 1 - eps, 1 + eps) A) with r = exp(log p - log p_old). On-policy with
    one step per batch, r = 1 and the gradient is -A ∇log p(y_t).
    """
    _check_normalizer(normalizer)
    if clip_eps < 0:
        raise ValueError(f"clip_eps must be >= 0, got {clip_eps}")
    if kl_coef < 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
    if kl_coef > 0 and inputs.ref_kl is None:
        raise ValueError("kl_coef > 0 needs ref_kl")
    valid = inputs.response_mask.bool()
    logp = inputs.student_logprobs
    zero = logp.new_zeros(())
    # Zero the log-ratio on padding before exp: exp(+inf) there would turn a zero gradient into NaN.
    log_ratio = torch.where(valid, logp - inputs.old_logprobs.detach().to(logp.dtype), zero)
    ratio = log_ratio.exp()  # (B, T)
    adv = inputs.advantages.detach().to(logp.dtype).unsqueeze(-1)  # (B, 1), same for every token of a sequence
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * adv)
    pg_sum = -torch.where(valid, surrogate, zero).sum()
    loss = pg_sum / normalizer
    # The clip is active (zero gradient) where the ratio has left the trust region in A's direction.
    clipped = valid & (((adv > 0) & (ratio > 1.0 + clip_eps)) | ((adv < 0) & (ratio < 1.0 - clip_eps)))
    n_tok = max(int(valid.sum()), 1)
    metrics = {
        "grpo/clip_frac": float(clipped.sum()) / n_tok,
        "grpo/adv_mean": float(inputs.advantages.detach().float().mean()) if inputs.advantages.numel() else 0.0,
        "grpo/ratio_mean": float(torch.where(valid, ratio.detach(), zero).sum()) / n_tok,
        "loss/grpo_pg": float(pg_sum.detach()) / normalizer,
        "tokens/response": float(valid.sum()),
    }
    if inputs.ref_kl is not None:
        kl_sum = torch.where(valid, inputs.ref_kl, inputs.ref_kl.new_zeros(())).sum()
        if kl_coef > 0:
            loss = loss + kl_coef * kl_sum / normalizer
        metrics["grpo/ref_kl_mean"] = float(kl_sum.detach()) / n_tok  # per token, without kl_coef
    metrics["loss/grpo"] = float(loss.detach())
    return LossOutput(loss=loss, metrics=metrics)


# ---------------------------------------------------------------- centred target (departure)


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

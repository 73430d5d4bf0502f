"""Per-token log-probability, entropy and KL from hidden states, in position slices.

Implements steps 2 and 7 of ALGORITHM.md: the exact full-vocabulary entropy H_t of the student's
next-token distribution, and the exact KL(p_ref(.|s_t) || p_theta(.|s_t)) for the anchor. Both need
full-vocabulary logits, and a (B, T, V) tensor is large (V = 49,152 for SmolLM2; 150k for Qwen), so
logits are only ever built for ``slice_size`` positions at a time from the final hidden states, and
each slice is wrapped in activation checkpointing: the backward pass recomputes that slice's logits
instead of keeping them, so no (B, T, V) tensor exists in the forward or the backward.

``reverse_kl_sliced`` is the same computation against a second model's hidden states: the exact per-position
KL(p_theta || q) to a teacher (white-box OPD, ``opd.estimator=full``) or to the reference (GRPO's optional KL).

Logits are cast to fp32 before the softmax whatever the model's dtype (fidelity rule: fp32 entropy).

Alignment convention: ``hidden[:, t]`` is the state that *produced* ``labels[:, t]`` (the caller
shifts by one: the hidden state at absolute position p predicts the token at p + 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

Head = Callable[[Tensor], Tensor]  # (..., D) hidden -> (..., V) logits


@dataclass
class TokenStats:
    logprobs: Tensor  # (B, T) log p(labels_t), differentiable through `hidden`
    entropy: Tensor | None  # (B, T) H_t in nats, or None when not asked for
    kl_ref_to_student: Tensor | None  # (B, T) KL(p_ref || p) in nats, or None without a reference


def _slice_stats(
    hidden: Tensor,  # (B, S, D)
    labels: Tensor,  # (B, S)
    ref_hidden: Tensor | None,  # (B, S, D), no grad
    head: Head,
    ref_head: Head,  # used only with ref_hidden
    want_entropy: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    logp = F.log_softmax(head(hidden).float(), dim=-1)  # (B, S, V) fp32
    tok = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # (B, S)
    empty = tok.new_zeros(0)
    ent = -(logp.exp() * logp).sum(-1) if want_entropy else empty
    if ref_hidden is not None:
        with torch.no_grad():  # the reference is frozen: no gradient reaches it
            ref_logp = F.log_softmax(ref_head(ref_hidden).float(), dim=-1)
        # KL(p_ref || p_theta) = sum_v p_ref (log p_ref - log p_theta); the expectation is under the
        # reference, so the gradient flows only through log p_theta.
        kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
    else:
        kl = empty
    return tok, ent, kl


def token_stats(
    hidden: Tensor,  # (B, T, D) student hidden states aligned with labels
    head: Head,
    labels: Tensor,  # (B, T) token ids
    *,
    ref_hidden: Tensor | None = None,  # (B, T, D) reference hidden states, aligned the same way
    ref_head: Head | None = None,
    want_entropy: bool = False,
    slice_size: int = 128,
    use_checkpoint: bool = True,
) -> TokenStats:
    """Log-probs of ``labels`` (and optionally entropy and KL to a reference), ``slice_size`` positions at a time."""
    if slice_size <= 0:
        raise ValueError(f"slice_size must be > 0, got {slice_size}")
    ref_fn = head if ref_head is None else ref_head  # the reference shares the student's head unless given
    T = labels.shape[1]
    toks, ents, kls = [], [], []
    for s in range(0, T, slice_size):
        e = min(T, s + slice_size)
        args = (hidden[:, s:e], labels[:, s:e], None if ref_hidden is None else ref_hidden[:, s:e])
        if use_checkpoint and torch.is_grad_enabled() and hidden.requires_grad:
            out = checkpoint(_slice_stats, *args, head, ref_fn, want_entropy, use_reentrant=False)
        else:
            out = _slice_stats(*args, head, ref_fn, want_entropy)
        toks.append(out[0])
        ents.append(out[1])
        kls.append(out[2])
    return TokenStats(
        logprobs=torch.cat(toks, dim=1),
        entropy=torch.cat(ents, dim=1) if want_entropy else None,
        kl_ref_to_student=torch.cat(kls, dim=1) if ref_hidden is not None else None,
    )


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

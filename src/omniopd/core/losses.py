"""The losses (ALGORITHM.md steps 7-8 and "Baselines"): one input record, one signature, one registry.

Every training method turns its micro-batch into a :class:`LossInputs` (per-token tensors, position t being
response token t) and names a registered loss; the trainer runs the one micro-batch loop
(``training step``: forward -> ``LOSSES[name](inputs, normalizer, **options)`` -> backward) and sums each
micro-batch's ``LossOutput.sums``, which the loss's ``finish`` turns into the logged metrics. A loss is

    loss(inputs: LossInputs, normalizer: float, **options) -> LossOutput

Conventions shared by all: a sum over tokens divided by a constant ``normalizer`` (the number of sequences in
the optimizer step, across accumulation), never by a batch-varying token count, so the audited fraction or
response lengths do not change the effective learning rate (SFT's ``token_mean`` is the one labelled
exception); padding removed with ``torch.where``, never by multiplying by a mask, so a -inf log-probability on a
padded position cannot make NaN; weights and advantages detached.

- **omniopd**: L = - sum_c pi_hat(c) sum_{t in c} log p(y_t) + beta * sum_{t unaudited} KL(p_ref || p)_t. pi_hat
  is a detached weight: a weighted likelihood, backpropagated directly, not a policy-gradient reward.
- **sft**: negative log-likelihood of the target tokens (``token_mean=True``: over their count, the Hugging Face
  causal-LM convention, offered for comparison with HF trainers).
- **opd_sampled** (Tinker): -sum_t A_t log p(y_t), A_t = log q_T(y_t) - log p(y_t) (per token; across tokenizers
  the span log-ratio, ``core.spans``). For y_t ~ p with the prefix fixed, E[-A ∇log p(y)] = sum_y ∇p (log p - log
  q) = ∇KL(p || q), since sum_y p ∇log p = 0: per position, no credit to earlier tokens (Tinker's discount 0).
- **opd_full** (GKD): the exact full-vocabulary reverse KL(p || q_T) per position
  (``core.token_stats.reverse_kl_sliced``).
- **grpo**: the PPO-clipped surrogate with one group-relative advantage per sequence (``core.advantages``),
  tokens summed over the constant normalizer (as Dr. GRPO; a departure from the GRPO paper's 1/|o_i|), plus
  ``kl_coef`` * KL(p || p_ref) when asked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor


@dataclass
class LossInputs:
    """One micro-batch's per-token signals, (B, T) each; a method fills the fields its loss reads."""

    response_mask: Tensor  # bool: real response tokens (EOS included, padding excluded)
    logprobs: Tensor | None = None  # log p_theta(y_t), with grad (every loss but opd_full reads it)
    ce_mask: Tensor | None = None  # bool: tokens whose -log p is weighted (sft: the target; omniopd: its chunks)
    ce_weights: Tensor | None = None  # detached weight of each of them (omniopd: its chunk's pi_hat); None: 1
    kl: Tensor | None = (
        None  # a per-token KL with grad (omniopd: KL(p_ref || p); grpo: KL(p || p_ref); opd: KL(p || q))
    )
    kl_mask: Tensor | None = None  # bool: tokens the KL applies to (omniopd: the unaudited ones); None: every one
    advantages: Tensor | None = None  # detached: (B,) one per sequence (grpo) or (B, T) one per token (opd)
    old_logprobs: Tensor | None = None  # the sampling policy's log p (grpo's ratio); None: this policy's, detached
    extra: dict[str, float] = field(default_factory=dict)  # a method's own per-micro-batch sums (summed, logged)


@dataclass
class LossOutput:
    loss: Tensor  # scalar, already divided by the normalizer
    metrics: dict[str, float] = field(default_factory=dict)  # this micro-batch's values (what tests read)
    sums: dict[str, float] = field(default_factory=dict)  # additive over micro-batches: ``finish`` reads the totals


LossFn = Callable[..., LossOutput]  # (inputs, normalizer, **options) -> LossOutput
FinishFn = Callable[..., dict[str, float]]  # (summed sums, normalizer, **options) -> logged metrics


@dataclass(frozen=True)
class Loss:
    name: str
    fn: LossFn
    finish: FinishFn

    def __call__(self, inputs: LossInputs, normalizer: float, **options) -> LossOutput:
        return self.fn(inputs, normalizer, **options)


LOSSES: dict[str, Loss] = {}


def register_loss(name: str, finish: FinishFn) -> Callable[[LossFn], LossFn]:
    """Register ``fn`` as the loss ``name`` (a method names it; ``finish`` turns its summed ``sums`` into metrics)."""

    def wrap(fn: LossFn) -> LossFn:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is registered twice")
        LOSSES[name] = Loss(name, fn, finish)
        return fn

    return wrap


def get_loss(name: str) -> Loss:
    if name not in LOSSES:
        raise KeyError(f"unknown loss {name!r}: registered are {', '.join(sorted(LOSSES))}")
    return LOSSES[name]


def _check_normalizer(normalizer: float) -> None:
    if normalizer <= 0:
        raise ValueError(f"normalizer must be > 0, got {normalizer}")


def _required(x: LossInputs, loss: str, *names: str) -> None:
    missing = [n for n in names if getattr(x, n) is None]
    if missing:
        raise ValueError(f"loss {loss!r} needs LossInputs.{missing[0]}")


# ---------------------------------------------------------------- OmniOPD


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


def _finish_omniopd(s: dict[str, float], normalizer: float, *, kl_anchor_coef: float) -> dict[str, float]:
    audited, unaudited = s.get("tokens/audited", 0.0), s.get("tokens/unaudited", 0.0)
    chunk, kl_sum = s.get("chunk", 0.0), s.get("kl_sum", 0.0)
    return {
        "loss/chunk": chunk,
        "loss/kl_anchor": kl_sum / max(unaudited, 1.0),  # per unaudited token, without beta
        "loss/total": chunk + kl_anchor_coef * kl_sum / normalizer,
        "audit/token_frac": audited / max(audited + unaudited, 1.0),
    }


@register_loss("omniopd", _finish_omniopd)
def omniopd_loss(x: LossInputs, normalizer: float, *, kl_anchor_coef: float) -> LossOutput:
    """Weighted chunk log-likelihood (``ce_mask``, ``ce_weights``: pi_hat) + beta * KL anchor on the unaudited
    tokens (``kl``: KL(p_ref || p); ``kl_mask``: the tokens outside every chunk), / ``normalizer``."""
    _check_normalizer(normalizer)
    _required(x, "omniopd", "logprobs", "ce_mask", "ce_weights", "kl")
    logp, ce_mask, ce_w, kl = x.logprobs, x.ce_mask, x.ce_weights, x.kl
    assert logp is not None and ce_mask is not None and ce_w is not None and kl is not None  # checked above
    valid = x.response_mask.bool()
    audited = ce_mask.bool() & valid
    unaudited = valid & (x.kl_mask.bool() if x.kl_mask is not None else ~audited)
    w = ce_w.detach().to(logp.dtype)
    zero = logp.new_zeros(())
    chunk_term = -torch.where(audited, w * logp, zero).sum()
    kl_sum = torch.where(unaudited, kl, zero).sum()
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
    sums = {
        "chunk": metrics["loss/chunk"],
        "kl_sum": float(kl_sum.detach()),
        "tokens/audited": metrics["tokens/audited"],
        "tokens/unaudited": metrics["tokens/unaudited"],
    }
    return LossOutput(loss=loss, metrics=metrics, sums=sums)


# ---------------------------------------------------------------- SFT


def _finish_sft(s: dict[str, float], normalizer: float, *, token_mean: bool = False) -> dict[str, float]:
    n = s.get("tokens/target", 0.0)
    return {
        "loss/total": s.get("loss", 0.0),
        "loss/sft": s.get("loss", 0.0),
        "sft/nll_per_token": s.get("nll", 0.0) / max(n, 1.0),
        "sft/target_tokens": n,
    }


@register_loss("sft", _finish_sft)
def sft_loss(x: LossInputs, normalizer: float, *, token_mean: bool = False) -> LossOutput:
    """NLL of the target tokens (``ce_mask``; ``ce_weights`` None: weight 1), summed, / ``normalizer``.

    ``token_mean=True`` divides by this micro-batch's number of target tokens instead (``normalizer`` is then
    unused): Hugging Face's ``model(input_ids, labels=labels).loss`` for one batch.
    """
    _check_normalizer(normalizer)
    _required(x, "sft", "logprobs", "ce_mask")
    logp, ce_mask = x.logprobs, x.ce_mask
    assert logp is not None and ce_mask is not None  # checked above
    mask = ce_mask.bool() & x.response_mask.bool()
    zero = logp.new_zeros(())
    weighted = logp if x.ce_weights is None else x.ce_weights.detach().to(logp.dtype) * logp
    nll_sum = -torch.where(mask, weighted, zero).sum()
    n_target = int(mask.sum())
    denom = float(max(n_target, 1)) if token_mean else normalizer  # all-masked: 0 / 1, not 0 / 0
    loss = nll_sum / denom
    metrics = {
        "loss/sft": float(loss.detach()),
        "sft/nll_per_token": float(nll_sum.detach()) / max(n_target, 1),
        "tokens/target": float(n_target),
    }
    sums = {"loss": metrics["loss/sft"], "nll": float(nll_sum.detach()), "tokens/target": float(n_target)}
    return LossOutput(loss=loss, metrics=metrics, sums=sums)


# ---------------------------------------------------------------- OPD


def _finish_opd(s: dict[str, float], normalizer: float) -> dict[str, float]:
    n = s.get("tokens/response", 0.0)
    out = {
        "loss/total": s.get("loss", 0.0),
        "loss/opd": s.get("loss", 0.0),
        "opd/reverse_kl_mean": s.get("kl_sum", 0.0) / max(n, 1.0),
    }
    if "adv_sq_sum" in s:  # sampled: the spread of the per-token advantages the update sees
        mean = s["adv_sum"] / max(n, 1.0)
        out["opd/advantage_mean"] = mean
        out["opd/advantage_std"] = ((s["adv_sq_sum"] - n * mean * mean) / (n - 1)) ** 0.5 if n > 1 else 0.0
    return out


@register_loss("opd_sampled", _finish_opd)
def opd_sampled_loss(x: LossInputs, normalizer: float) -> LossOutput:
    """-sum_t A_t log p(y_t) / ``normalizer``, ``advantages`` (B, T): log q_T(y_t) - log p(y_t), detached."""
    _check_normalizer(normalizer)
    _required(x, "opd_sampled", "logprobs", "advantages")
    logp = x.logprobs
    assert logp is not None and x.advantages is not None  # checked above
    valid = x.response_mask.bool()
    zero = logp.new_zeros(())
    adv = torch.where(valid, x.advantages.detach().to(logp.dtype), zero)  # padding may hold -inf: zeroed first
    loss = -torch.where(valid, adv * logp, zero).sum() / normalizer
    n_tok = max(int(valid.sum()), 1)
    metrics = {
        "loss/opd": float(loss.detach()),
        # mean of log p - log q over sampled tokens: the single-sample (k1) estimate of the reverse KL
        "opd/reverse_kl_mean": float(-adv.sum()) / n_tok,
        "tokens/response": float(valid.sum()),
    }
    a = adv.detach().double()
    sums = {
        "loss": metrics["loss/opd"],
        "kl_sum": float(-adv.sum()),
        "tokens/response": metrics["tokens/response"],
        "adv_sum": float(a.sum()),
        "adv_sq_sum": float((a * a).sum()),
    }
    return LossOutput(loss=loss, metrics=metrics, sums=sums)


@register_loss("opd_full", _finish_opd)
def opd_full_loss(x: LossInputs, normalizer: float) -> LossOutput:
    """sum_t KL(p_theta || q_T)_t over real tokens / ``normalizer`` (``kl``: exact, full vocabulary)."""
    _check_normalizer(normalizer)
    _required(x, "opd_full", "kl")
    assert x.kl is not None  # checked above
    valid = x.response_mask.bool()
    kl_sum = torch.where(valid, x.kl, x.kl.new_zeros(())).sum()
    loss = kl_sum / normalizer
    metrics = {
        "loss/opd": float(loss.detach()),
        "opd/reverse_kl_mean": float(kl_sum.detach()) / max(int(valid.sum()), 1),  # per token
        "tokens/response": float(valid.sum()),
    }
    sums = {
        "loss": metrics["loss/opd"],
        "kl_sum": float(kl_sum.detach()),
        "tokens/response": metrics["tokens/response"],
    }
    return LossOutput(loss=loss, metrics=metrics, sums=sums)


# ---------------------------------------------------------------- GRPO


def _finish_grpo(s: dict[str, float], normalizer: float, *, clip_eps: float = 0.2, kl_coef: float = 0.0) -> dict:
    out = {"loss/total": s.get("loss", 0.0), "loss/grpo": s.get("loss", 0.0), "grpo/skipped_flat_batch": 0.0}
    if kl_coef > 0:
        out["grpo/ref_kl_mean"] = s.get("kl_sum", 0.0) / max(s.get("tokens/response", 0.0), 1.0)
    return out


@register_loss("grpo", _finish_grpo)
def grpo_loss(x: LossInputs, normalizer: float, *, clip_eps: float = 0.2, kl_coef: float = 0.0) -> LossOutput:
    """PPO-clipped surrogate summed over real tokens / ``normalizer``, plus kl_coef * sum ``kl`` / ``normalizer``.

    Per token: -min(r A, clip(r, 1 - eps, 1 + eps) A), r = exp(log p - log p_old), ``advantages`` (B,) one per
    sequence. On-policy with one step per batch (``old_logprobs`` None: log p detached), r = 1 and the gradient
    is -A ∇log p(y_t).
    """
    _check_normalizer(normalizer)
    if clip_eps < 0:
        raise ValueError(f"clip_eps must be >= 0, got {clip_eps}")
    if kl_coef < 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
    if kl_coef > 0 and x.kl is None:
        raise ValueError("kl_coef > 0 needs LossInputs.kl")
    _required(x, "grpo", "logprobs", "advantages")
    logp = x.logprobs
    assert logp is not None and x.advantages is not None  # checked above
    valid = x.response_mask.bool()
    old = logp.detach() if x.old_logprobs is None else x.old_logprobs.detach().to(logp.dtype)
    zero = logp.new_zeros(())
    # Zero the log-ratio on padding before exp: exp(+inf) there would turn a zero gradient into NaN.
    ratio = torch.where(valid, logp - old, zero).exp()  # (B, T)
    adv = x.advantages.detach().to(logp.dtype).unsqueeze(-1)  # (B, 1), the same for every token of a sequence
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * adv)
    pg_sum = -torch.where(valid, surrogate, zero).sum()
    loss = pg_sum / normalizer
    # The clip is active (zero gradient) where the ratio has left the trust region in A's direction.
    clipped = valid & (((adv > 0) & (ratio > 1.0 + clip_eps)) | ((adv < 0) & (ratio < 1.0 - clip_eps)))
    n_tok = max(int(valid.sum()), 1)
    metrics = {
        "grpo/clip_frac": float(clipped.sum()) / n_tok,
        "grpo/adv_mean": float(x.advantages.detach().float().mean()) if x.advantages.numel() else 0.0,
        "grpo/ratio_mean": float(torch.where(valid, ratio.detach(), zero).sum()) / n_tok,
        "loss/grpo_pg": float(pg_sum.detach()) / normalizer,
        "tokens/response": float(valid.sum()),
    }
    kl_sum = 0.0
    if x.kl is not None:
        kl_t = torch.where(valid, x.kl, x.kl.new_zeros(())).sum()
        if kl_coef > 0:
            loss = loss + kl_coef * kl_t / normalizer
        kl_sum = float(kl_t.detach())
        metrics["grpo/ref_kl_mean"] = kl_sum / n_tok  # per token, without kl_coef
    metrics["loss/grpo"] = float(loss.detach())
    sums = {"loss": metrics["loss/grpo"], "kl_sum": kl_sum, "tokens/response": metrics["tokens/response"]}
    return LossOutput(loss=loss, metrics=metrics, sums=sums)

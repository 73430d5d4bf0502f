"""The paper's method, OmniOPD (ALGORITHM.md): on-policy student samples; the audit picks the
highest-entropy chunks, asks the text-only teacher for N continuations of the prefix before each, and
turns their agreement with the student's chunk (phi) into a smoothed target weight; the loss is the
weighted chunk log-likelihood plus an exact KL anchor to the reference model on the other tokens.

Its audit can be pipelined (``pipeline.mode: one_step``, ``omniopd.training.pipeline``; a departure it names): with an
API teacher the audit of step t then runs in a worker thread while step t+1's rollouts are sampled."""

from __future__ import annotations

from omniopd.config import RunConfig
from omniopd.core import LossInputs, token_weights_from_chunks
from omniopd.data import Example
from omniopd.engine.alignment import SequenceBatch
from omniopd.engine.forward import response_token_stats
from omniopd.engine.rollout import Rollouts
from omniopd.methods.base import LossSpec, Method, TeacherRole, TrainState, sample_on_policy, sampling_departures
from omniopd.methods.omniopd.audit import AuditResult, run_audit
from omniopd.methods.omniopd.phi import phi_by_name


def prepare(state: TrainState) -> None:
    """Resolve phi at setup, so a missing embedding model fails before any rollout."""
    phi_by_name(state.cfg.audit.phi)


def audit(state: TrainState, rollouts: Rollouts, examples: list[Example]) -> AuditResult:
    cfg = state.cfg
    stats = (
        (rollouts.entropy, rollouts.logprobs)
        if rollouts.entropy is not None and rollouts.logprobs is not None
        else None
    )
    result = run_audit(
        step=state.step + 1,
        model=state.accelerator.unwrap_model(state.model),
        tokenizer=state.tokenizer,
        batch=rollouts.batch,
        lengths=rollouts.lengths,
        examples=[examples[i] for i in rollouts.example_index],
        teacher=state.teacher,
        audit_cfg=cfg.audit,
        teacher_cfg=cfg.teacher,
        seed=cfg.seed + 104_729 * state.accelerator.process_index,  # rank 0: the one-process seeds
        micro_batch_size=cfg.optim.micro_batch_size,
        slice_size=cfg.loss.slice_size,
        record_trajectories=cfg.audit.record_trajectories,
        token_stats=stats,
    )
    return result


def loss(cfg: RunConfig) -> LossSpec:
    return "omniopd", {"kl_anchor_coef": cfg.loss.kl_anchor_coef}


def loss_inputs(state: TrainState, idx: list[int], sub: SequenceBatch, result: AuditResult) -> LossInputs:
    """The chunks' targets spread on their tokens (the likelihood weights), and the exact KL(p_ref || p) on every
    token outside them (the anchor)."""
    cfg = state.cfg
    T = sub.response_ids.shape[1]
    weights, chunk_mask = token_weights_from_chunks(
        [result.starts_B[j] for j in idx], [result.loss_weights_B[j] for j in idx], cfg.audit.chunk_tokens, T
    )
    stats = response_token_stats(state.model, sub, ref_model=state.ref_model, slice_size=cfg.loss.slice_size)
    device = stats.logprobs.device
    return LossInputs(
        logprobs=stats.logprobs,
        response_mask=sub.response_mask,
        ce_mask=chunk_mask.to(device),
        ce_weights=weights.to(device),
        kl=stats.kl_ref_to_student,
        kl_mask=~chunk_mask.to(device),
    )


def departures(cfg: RunConfig) -> list[str]:
    """What the config changes from the paper's method: labelled departures and the paper's ablations."""
    out = []
    if cfg.audit.target == "centered":
        out.append("centred target (departure)")
    if cfg.audit.phi == "embedding":
        out.append("embedding φ (departure)")
    if cfg.audit.adaptive_n:
        out.append(f"adaptive N, rounds of {cfg.audit.adaptive_round}, width {cfg.audit.adaptive_width:g} (departure)")
    if cfg.loss.kl_anchor_coef == 0:
        out.append("no KL anchor (ablation)")
    if cfg.audit.prior_strength == 0:
        out.append("no prior α=0 (ablation)")
    if cfg.audit.constant_k is not None:
        out.append(f"no teacher: k_sem = {cfg.audit.constant_k:g} for every chunk (ablation)")
    if cfg.audit.anchors != "peak_entropy":
        out.append(f"anchors={cfg.audit.anchors} (ablation)")
    if cfg.pipeline.mode == "one_step":
        out.append("one-step-off-policy pipeline, rollouts up to 1 step stale (departure)")
    return out + sampling_departures(cfg)


def accumulate(totals: dict[str, float], metrics: dict[str, float]) -> None:
    """The audited chunks and their k_sem sum (the run's mean k_sem in summary.json)."""
    if metrics.get("audit/chunks"):
        totals["chunks"] = totals.get("chunks", 0.0) + metrics["audit/chunks"]
        totals["k_sem_sum"] = totals.get("k_sem_sum", 0.0) + metrics["audit/k_sem_mean"] * metrics["audit/chunks"]


def _text_teacher(cfg: RunConfig) -> TeacherRole | None:
    return None if cfg.audit.constant_k is not None else "text"  # the constant-k ablation asks no teacher


OMNIOPD = Method(
    name="omniopd",
    sample=sample_on_policy,
    audit=audit,
    loss=loss,
    loss_inputs=loss_inputs,
    teacher_role=_text_teacher,
    on_policy=True,
    prepare=prepare,
    departures=departures,
    accumulate=accumulate,
)

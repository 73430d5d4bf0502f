"""The audit: entropy -> anchors -> teacher continuations -> phi -> targets (ALGORITHM.md steps 2-6).

Input: a batch of student rollouts. Output: for every trajectory, the start of each audited chunk and
its target pi_hat, plus metrics and human-readable audit records (``audits.jsonl``).

Fidelity notes, in the order the code enforces them:
- entropy and log-probs are those of the unmodified distribution each token was drawn from, exact over
  the full vocabulary, fp32: recorded by the rollout while sampling (``token_stats=``, see
  ``omniopd.engine.rollout``), or else from a fresh no-grad forward of the current student over the finished
  sequences, in position slices (:func:`student_token_stats`). The two agree up to float rounding (the
  sampler's cached incremental forward against one forward over the whole sequence; the weights are the same:
  the audit runs before the step's update);
- the teacher prefix is y_<t: it stops right before the audited chunk;
- a chunk is scored only with exactly N continuations (adaptive N: exactly the n its rounds asked
  for); a short or failed result is dropped and counted (``teacher/failed_chunks``), and a step that
  loses more than ``max_failed_chunk_frac`` of its chunks stops the run rather than train on what is left;
- teacher text is cut to C student tokens before phi (like with like across tokenizers);
- every record names the selector, phi and teacher that produced it.

Ablation: ``audit.constant_k`` gives every chunk that k_sem and asks no teacher (N scores of k/N each), so the
target follows p_bar alone.

Departures (off by default, labelled in the config and in every compare table): ``audit.target:
centered`` turns the loss weight of each chunk into pi_hat minus the step's mean pi_hat
(``core.target.centered_targets``; ``targets_B`` keeps pi_hat, ``weights_B`` holds what the loss
uses); ``audit.phi: embedding`` is resolved here by name from ``omniopd.methods.omniopd.phi`` so that
``core`` never imports a model; ``audit.adaptive_n`` asks the teacher in rounds and stops a chunk once
its Beta posterior is settled (``_teacher_rounds``), so a chunk may be scored on n < N continuations:
its target is (k + alpha p_bar) / (n + alpha), and its record and the step's metrics carry n
(``teacher_samples``, ``audit/teacher_samples_mean``, ``audit/adaptive_saved_frac``).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field, replace

import torch

from omniopd.config import AuditConfig, TeacherConfig
from omniopd.core import ANCHOR_SELECTORS, chunk_prior_mean, dm_target, k_sem
from omniopd.core.target import centered_targets, posterior_settled, posterior_width
from omniopd.data import Example
from omniopd.engine.alignment import SequenceBatch, cut_to_tokens, prefix_and_chunk_text
from omniopd.engine.forward import response_token_stats
from omniopd.errors import TeacherError
from omniopd.evaluation.stats import mix_seed
from omniopd.methods.omniopd.phi import phi_by_name
from omniopd.teachers.base import ContinuationRequest, SamplingSpec, Teacher


@dataclass
class AuditResult:
    starts_B: list[list[int]]  # kept chunk starts per trajectory (ascending)
    targets_B: list[list[float]]  # pi_hat per kept chunk
    metrics: dict[str, float] = field(default_factory=dict)
    records: list[dict] = field(default_factory=list)  # one per trajectory, for audits.jsonl
    weights_B: list[list[float]] | None = None  # the chunk loss weight: pi_hat (paper) or centred; None: targets_B
    samples_B: list[list[int]] | None = None  # adaptive N: teacher continuations per kept chunk; None: N each

    @property
    def loss_weights_B(self) -> list[list[float]]:
        return self.targets_B if self.weights_B is None else self.weights_B


@torch.no_grad()
def student_token_stats(
    model, batch: SequenceBatch, micro_batch_size: int, slice_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropy H_t and log p(y_t) for every response token: (B, T) each, fp32, no grad."""
    B, T = batch.response_ids.shape
    ent = torch.zeros(B, T)
    logp = torch.zeros(B, T)
    device = next(model.parameters()).device
    for i in range(0, B, micro_batch_size):
        idx = list(range(i, min(B, i + micro_batch_size)))
        sub = batch.select(idx).to(device)
        stats = response_token_stats(model, sub, want_entropy=True, slice_size=slice_size)
        t = sub.response_ids.shape[1]
        ent[i : i + len(idx), :t] = stats.entropy.float().cpu()
        logp[i : i + len(idx), :t] = stats.logprobs.float().cpu()
    mask = batch.response_mask
    return ent * mask, logp * mask


#: an API teacher's ledger counters (cumulative) whose growth during one audit is logged per step
BILLED_KEYS = ("teacher/cached_tokens", "teacher/cache_write_tokens", "teacher/cost_usd")


def _billed_this_step(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """What the teacher's ledger billed during this audit: prompt tokens read from and written to the provider's
    prompt cache, and dollars (the cumulative figures are logged as ``teacher/total_*``). Empty for a teacher
    without a ledger (in-process)."""
    return {k: after[k] - before.get(k, 0.0) for k in BILLED_KEYS if k in after}


def _quantile(values: list[float], q: float) -> float:
    return float(torch.tensor(values).quantile(q)) if values else 0.0


def round_seed(seed: int, round_index: int) -> int:
    """The sampling seed of adaptive round ``round_index``: round 0 uses the step's own seed (so
    ``adaptive_round = N`` asks for exactly what the single request of the paper's path asks for), every
    later round a distinct derived seed, so its continuations are new draws and not copies of earlier ones
    (an API response cache keys on the seed too)."""
    return seed if round_index == 0 else mix_seed(seed, round_index, bounded=True)


@dataclass
class _Rounds:
    continuations: list[list[str]]  # per planned chunk, cut to C student tokens, all rounds in order
    scores: list[list[float]]  # phi of each continuation
    prior: list[float]  # p_bar
    width: list[float]  # posterior interval width when the chunk stopped (nan for a failed chunk)
    failed_chunk: list[bool]
    failed: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    requests: int = 0
    rounds: int = 0


def _teacher_rounds(
    *,
    teacher: Teacher,
    tokenizer,
    audit_cfg: AuditConfig,
    spec: SamplingSpec,
    planned: list[tuple[int, int]],
    requests: list[ContinuationRequest],
    chunk_texts: list[str],
    logprobs: torch.Tensor,
    timings: dict[str, float],
) -> _Rounds:
    """The teacher's continuations and their phi scores for every planned chunk. The paper's path is one
    round of N continuations per chunk. Adaptive N (a departure, ``audit.adaptive_n``) asks in rounds of
    ``adaptive_round`` for every still-open chunk (one batched request list per round, a distinct seed per
    round); after each round a chunk closes once its posterior is settled (``core.target.posterior_settled``)
    or it has N. A chunk whose request fails in any round is dropped and counted."""
    C, N = audit_cfg.chunk_tokens, audit_cfg.teacher_samples
    R = audit_cfg.adaptive_round if audit_cfg.adaptive_n else N
    alpha, width = audit_cfg.prior_strength, audit_cfg.adaptive_width
    J = len(planned)
    out = _Rounds(
        continuations=[[] for _ in range(J)],
        scores=[[] for _ in range(J)],
        prior=[float(chunk_prior_mean(logprobs[b, s : s + C])) for b, s in planned],
        width=[float("nan")] * J,
        failed_chunk=[False] * J,
    )
    teacher_s = phi_s = 0.0
    if audit_cfg.constant_k is not None:  # the ablation without a teacher: every chunk scores the constant
        for j in range(J):
            out.scores[j] = [audit_cfg.constant_k / N] * N
        timings["time/teacher_s"] = timings["time/phi_s"] = 0.0
        return out
    t0 = time.perf_counter()
    phi, prime = phi_by_name(audit_cfg.phi)
    phi_s += time.perf_counter() - t0
    open_ = list(range(J))
    while open_:
        n_req = min(R, N - out.rounds * R)  # every open chunk has seen the same number of continuations
        rspec = replace(spec, n=n_req, seed=round_seed(spec.seed, out.rounds))
        t0 = time.perf_counter()
        results = teacher.continue_prefixes([requests[j] for j in open_], rspec)
        teacher_s += time.perf_counter() - t0
        out.requests += len(open_)
        out.rounds += 1

        t0 = time.perf_counter()
        cuts = [
            [cut_to_tokens(tokenizer, t, C)[0] for t in res.texts] if res.ok and len(res.texts) == n_req else []
            for res in results
        ]
        prime([*(chunk_texts[j] for j in open_), *(t for c in cuts for t in c)])
        still = []
        for j, res, cut in zip(open_, results, cuts, strict=True):
            out.tokens_in += res.prompt_tokens
            out.tokens_out += res.completion_tokens
            if not res.ok or len(res.texts) != n_req:
                out.failed += 1  # never score a round short of what it asked for: drop the chunk
                out.failed_chunk[j] = True
                continue
            _, scores = k_sem(chunk_texts[j], cut, phi)
            out.continuations[j] += cut
            out.scores[j] += scores
            k, n = sum(out.scores[j]), len(out.scores[j])
            if not audit_cfg.adaptive_n:
                continue  # the paper's path: one round of N
            if posterior_settled(k, n, out.prior[j], alpha, max_samples=N, width=width):
                out.width[j] = posterior_width(k, n, out.prior[j], alpha)  # kept in audits.jsonl
            else:
                still.append(j)
        phi_s += time.perf_counter() - t0
        open_ = still
    timings["time/teacher_s"] = teacher_s
    timings["time/phi_s"] = phi_s
    return out


def run_audit(
    *,
    step: int,  # the optimizer step this audit feeds, 1-based like metrics.jsonl
    model,
    tokenizer,
    batch: SequenceBatch,
    lengths: list[int],
    examples: list[Example],  # one per trajectory
    teacher: Teacher,
    audit_cfg: AuditConfig,
    teacher_cfg: TeacherConfig,
    seed: int,
    micro_batch_size: int,
    slice_size: int,
    record_trajectories: int = 2,
    token_stats: tuple[torch.Tensor, torch.Tensor] | None = None,  # (entropy, logprobs) (B, T) from the rollout
) -> AuditResult:
    C, M, N = audit_cfg.chunk_tokens, audit_cfg.num_chunks, audit_cfg.teacher_samples
    B = len(lengths)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    if token_stats is not None:
        entropy, logprobs = token_stats
        if entropy.shape != batch.response_ids.shape or logprobs.shape != batch.response_ids.shape:
            raise ValueError(
                f"token_stats of shape {tuple(entropy.shape)}/{tuple(logprobs.shape)} do not match the "
                f"responses {tuple(batch.response_ids.shape)}"
            )
        mask = batch.response_mask
        entropy, logprobs = entropy * mask, logprobs * mask
    else:
        entropy, logprobs = student_token_stats(model, batch, micro_batch_size, slice_size)
    timings["time/entropy_s"] = time.perf_counter() - t0

    select = ANCHOR_SELECTORS[audit_cfg.anchors]
    rng = random.Random(mix_seed(seed, step))
    planned: list[tuple[int, int]] = []  # (trajectory, start)
    for b in range(B):
        for s in select(entropy[b].tolist(), lengths[b], C, M, rng):
            planned.append((b, s))

    requests, chunk_texts, char_starts = [], [], []
    for b, s in planned:
        ids = batch.response_ids[b, : lengths[b]].tolist()
        prefix, chunk = prefix_and_chunk_text(tokenizer, ids, s, C)
        ex = examples[b]
        requests.append(
            ContinuationRequest(
                question=ex.question, prefix=prefix, reference=ex.reference, trajectory=b, instruction=ex.instruction
            )
        )
        chunk_texts.append(chunk)
        char_starts.append(len(prefix))

    spec = SamplingSpec(
        n=N,
        max_new_tokens=teacher_cfg.max_new_tokens or C,
        temperature=teacher_cfg.temperature,
        top_p=teacher_cfg.top_p,
        seed=mix_seed(seed, step),
    )
    starts_B: list[list[int]] = [[] for _ in range(B)]
    ksem_B: list[list[float]] = [[] for _ in range(B)]
    prior_B: list[list[float]] = [[] for _ in range(B)]
    chunk_records: list[list[dict]] = [[] for _ in range(B)]
    spent_before = teacher.metrics()
    rounds = _teacher_rounds(
        teacher=teacher,
        tokenizer=tokenizer,
        audit_cfg=audit_cfg,
        spec=spec,
        planned=planned,
        requests=requests,
        chunk_texts=chunk_texts,
        logprobs=logprobs,
        timings=timings,
    )
    spent = _billed_this_step(spent_before, teacher.metrics())
    failed, tokens_in, tokens_out = rounds.failed, rounds.tokens_in, rounds.tokens_out
    n_requests, n_rounds = rounds.requests, rounds.rounds
    samples_B: list[list[int]] | None = [[] for _ in range(B)] if audit_cfg.adaptive_n else None  # n per kept chunk
    for j, ((b, s), chunk, c0) in enumerate(zip(planned, chunk_texts, char_starts, strict=True)):
        if rounds.failed_chunk[j]:
            continue  # never score a chunk on fewer continuations than were asked for
        scores, p_bar = rounds.scores[j], rounds.prior[j]
        k = sum(scores)
        starts_B[b].append(s)
        ksem_B[b].append(k)
        prior_B[b].append(p_bar)
        if samples_B is not None:
            samples_B[b].append(len(scores))
        if b < record_trajectories:
            chunk_records[b].append(
                {
                    "start": s,
                    "end": s + C,
                    "char_start": c0,
                    "char_end": c0 + len(chunk),
                    "entropy": float(entropy[b, s]),
                    "student_text": chunk,
                    "continuations": rounds.continuations[j],
                    "phi_scores": scores,
                    "k_sem": k,
                    "prior_mean": p_bar,
                    **(
                        {"teacher_samples": len(scores), "posterior_width": rounds.width[j]}
                        if samples_B is not None
                        else {}
                    ),
                }
            )

    if planned and failed / len(planned) > audit_cfg.max_failed_chunk_frac:
        raise TeacherError(
            f"step {step}: the teacher failed on {failed} of {len(planned)} chunks "
            f"(more than audit.max_failed_chunk_frac={audit_cfg.max_failed_chunk_frac}); stopping instead of training on too few audits"
        )

    flat_k = [k for ks in ksem_B for k in ks]
    flat_p = [p for ps in prior_B for p in ps]
    flat_n = [n for ns in samples_B for n in ns] if samples_B is not None else [N] * len(flat_k)
    n_arg = torch.tensor(flat_n) if samples_B is not None else N  # adaptive N: each chunk on its own n
    targets = (
        dm_target(torch.tensor(flat_k), torch.tensor(flat_p), n_arg, audit_cfg.prior_strength).tolist()
        if flat_k
        else []
    )
    # departure "centred target": the loss weight is pi_hat minus the step's mean pi_hat (can be < 0)
    weights = centered_targets(targets).tolist() if audit_cfg.target == "centered" else list(targets)
    targets_B: list[list[float]] = []
    weights_B: list[list[float]] = []
    pos = 0
    for b in range(B):
        n = len(ksem_B[b])
        targets_B.append(targets[pos : pos + n])
        weights_B.append(weights[pos : pos + n])
        for rec, tgt, w in zip(chunk_records[b], targets[pos : pos + n], weights[pos : pos + n]):
            rec["target"] = tgt
            rec["weight"] = w
        pos += n

    anchor_mask = torch.zeros_like(batch.response_mask)
    for b, starts in enumerate(starts_B):
        for s in starts:
            anchor_mask[b, s] = True
    other = batch.response_mask & ~anchor_mask
    metrics = {
        "audit/chunks": float(len(flat_k)),
        "audit/chunks_per_traj": len(flat_k) / max(B, 1),
        "audit/skipped_short": float(sum(1 for L in lengths if L < C)),
        "audit/k_sem_mean": sum(flat_k) / len(flat_k) if flat_k else 0.0,
        "audit/k_sem_p10": _quantile(flat_k, 0.1),
        "audit/k_sem_p50": _quantile(flat_k, 0.5),
        "audit/k_sem_p90": _quantile(flat_k, 0.9),
        "audit/k_sem_interior_frac": sum(0.05 * n < k < 0.95 * n for k, n in zip(flat_k, flat_n)) / len(flat_k)
        if flat_k
        else 0.0,
        "audit/k_sem_zero_frac": sum(k == 0 for k in flat_k) / len(flat_k) if flat_k else 0.0,
        "audit/target_mean": sum(targets) / len(targets) if targets else 0.0,
        "audit/target_min": min(targets) if targets else 0.0,
        "audit/target_max": max(targets) if targets else 0.0,
        "audit/prior_mean": sum(flat_p) / len(flat_p) if flat_p else 0.0,
        **(
            {
                "audit/weight_neg_frac": sum(w < 0 for w in weights) / len(weights) if weights else 0.0,
                "audit/weight_min": min(weights) if weights else 0.0,
            }
            if audit_cfg.target == "centered"
            else {}
        ),
        "audit/entropy_anchor_mean": float(entropy[anchor_mask].mean()) if anchor_mask.any() else 0.0,
        "audit/entropy_other_mean": float(entropy[other].mean()) if other.any() else 0.0,
        "audit/entropy_from_rollout": float(token_stats is not None),  # 0: computed by a second forward
        "teacher/requests": float(n_requests),
        "teacher/failed_chunks": float(failed),
        "teacher/tokens_in": float(tokens_in),
        "teacher/tokens_out": float(tokens_out),
        "teacher/tokens": float(tokens_in + tokens_out),
        **spent,
        **timings,
    }
    if samples_B is not None:
        metrics.update(
            {
                "audit/teacher_samples_mean": sum(flat_n) / len(flat_n) if flat_n else 0.0,
                "audit/adaptive_saved_frac": 1.0 - sum(flat_n) / (len(flat_n) * N) if flat_n else 0.0,
                "audit/adaptive_full_frac": sum(n == N for n in flat_n) / len(flat_n) if flat_n else 0.0,
                "audit/adaptive_rounds": float(n_rounds),
                "audit/k_sem_rate_mean": sum(k / n for k, n in zip(flat_k, flat_n)) / len(flat_k) if flat_k else 0.0,
            }
        )

    records = []
    for b in range(min(B, record_trajectories)):
        ids = batch.response_ids[b, : lengths[b]].tolist()
        records.append(
            {
                "step": step,
                "trajectory": b,
                "example_id": examples[b].id,
                "prompt": examples[b].question,
                "response": tokenizer.decode(ids, skip_special_tokens=True),
                "response_tokens": lengths[b],
                "selector": audit_cfg.anchors,
                "phi": audit_cfg.phi,
                "target": audit_cfg.target,
                "teacher": teacher.name,
                "chunks": chunk_records[b],
                **(
                    {
                        "adaptive_n": {
                            "round": audit_cfg.adaptive_round,
                            "width": audit_cfg.adaptive_width,
                            "max_samples": N,
                        }
                    }
                    if audit_cfg.adaptive_n
                    else {}
                ),
            }
        )
    return AuditResult(
        starts_B=starts_B,
        targets_B=targets_B,
        metrics=metrics,
        records=records,
        weights_B=weights_B,
        samples_B=samples_B,
    )

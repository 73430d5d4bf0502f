"""What every training method shares: the :class:`Method` slots the trainer's loop asks for, the state a
step reads and updates, and the pieces more than one method uses (on-policy sampling, micro-batching).

The loop is the same for every method (``trainer.train_step``)::

    examples -> method.sample -> method.audit -> per micro-batch: method.loss_inputs -> the registered loss
    (method.loss) -> backward -> optimizer -> method.accumulate -> log

and the required slots of a :class:`Method` are filled by each method (``omniopd``, ``sft``, ``opd``,
``grpo``; the registry is ``omniopd.methods.METHODS``), so neither the trainer nor ``omniopd compare``
tests a method's name. The step's pipeline (``TrainState.pipeline``, ``omniopd.training.pipeline``) calls the
``sample`` and ``audit`` slots: one after the other (the default), or with ``pipeline.mode: one_step`` the
audit in a worker thread beside the next step's ``sample``; a method's ``teacher_role`` and ``on_policy``
say whether it can be pipelined (an on-policy method with a text teacher: OmniOPD).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Generic, Iterator, Literal, Protocol, TypeVar

import torch

from omniopd.config import RunConfig
from omniopd.core.losses import LossInputs
from omniopd.data import Example, PromptStream
from omniopd.engine.alignment import SequenceBatch
from omniopd.engine.prompts import student_messages
from omniopd.engine.rollout import Rollouts, chat_prompts, sample_rollouts_as
from omniopd.errors import TeacherError
from omniopd.teachers.base import Teacher

if TYPE_CHECKING:
    from accelerate import Accelerator
    from transformers import PreTrainedTokenizerBase

    from omniopd.training.loggers import MetricLoggers
    from omniopd.training.strategy import Replicated

# What the teacher does for a method (None: no teacher is built):
# - "text": it writes continuations of the student's prefixes, which the audit compares with the student's
#   chunks by phi (OmniOPD; preflighted at setup, and what ``check-signal`` tests);
# - "solutions": it writes one solution per prompt to train on (SFT from the teacher);
# - "logits": its log-probabilities over the student's own tokens are read (white-box OPD).
TeacherRole = Literal["text", "solutions", "logits"]


# --- a step's sampled batch, and the default (on-policy) way to sample and audit it (``omniopd.training.pipeline``
# builds the pipelined one on these)


@dataclass
class SampledBatch:
    """One step's prompts (this rank's share) and the student's samples of them."""

    examples: list[Example]
    rollouts: Rollouts
    policy_step: int  # the optimizer steps the sampling weights had taken (0: the initial student)
    stream_state: dict  # the prompt stream's position before these prompts were drawn
    seconds: float  # spent sampling them
    metrics: dict[str, float] = field(default_factory=dict)  # logged with the step that trains on them


def _wait_for_device(device) -> None:
    if device.type == "cuda":  # CUDA runs asynchronously: the sampling's seconds include its queued work
        torch.cuda.synchronize(device)


def sample_batch(state: TrainState, method: Method, token_stats: bool = False) -> SampledBatch:
    """The stream's next prompts (this rank's share), sampled with the current weights. ``token_stats``: make
    sure the rollouts carry the entropy and log-probs of the sampling weights (computed now if the rollout
    could not record them)."""
    acc = state.accelerator
    stream_state = state.stream.state_dict()
    examples = state.stream.next_batch()  # the global batch: every rank advances the stream alike
    if acc.num_processes > 1:
        from omniopd.training.distributed import rank_slice

        examples = rank_slice(examples, acc.process_index, acc.num_processes)
    t0 = time.perf_counter()
    rollouts = method.sample(state, examples)
    if token_stats and (rollouts.entropy is None or rollouts.logprobs is None):
        from omniopd.methods.omniopd.audit import student_token_stats

        t1 = time.perf_counter()
        rollouts.entropy, rollouts.logprobs = student_token_stats(
            acc.unwrap_model(state.model), rollouts.batch, state.cfg.optim.micro_batch_size, state.cfg.loss.slice_size
        )
        # logged with the audit's metrics (which these entries override): a second forward, not the rollout's own
        rollouts.metrics.update({"audit/entropy_from_rollout": 0.0, "time/entropy_forward_s": time.perf_counter() - t1})
    _wait_for_device(acc.device)
    seconds = time.perf_counter() - t0
    return SampledBatch(examples, rollouts, state.step, stream_state, seconds, {"time/rollout_s": seconds})


class OnPolicy:
    """``pipeline.mode: off``: a step samples its own prompts with the current weights, then audits them."""

    def next_batch(self, state: TrainState, method: Method) -> SampledBatch:
        return sample_batch(state, method)

    def audit(self, state: TrainState, method: Method, sampled: SampledBatch) -> Any:
        return method.audit(state, sampled.rollouts, sampled.examples)

    def state_dict(self) -> dict | None:
        """What a checkpoint must hold to resume exactly (nothing: every step samples afresh)."""
        return None

    def load_state_dict(self, saved: dict | None, state: TrainState) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class TrainState:
    """Everything a training step reads and updates (built by ``trainer.setup``)."""

    cfg: RunConfig
    accelerator: Accelerator
    model: torch.nn.Module
    ref_model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    teacher: Teacher
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    stream: PromptStream
    out_dir: Path
    strategy: Replicated  # how the student is laid out over the processes (training.strategy: ddp, fsdp2)
    loggers: MetricLoggers | None = None  # the main process's; None on the others
    step: int = 0
    totals: dict[str, float] = field(default_factory=dict)
    extras: dict = field(default_factory=dict)  # method-specific state built at setup (SFT targets)
    last_checkpoint: int | None = None  # the step of the newest checkpoint (every rank keeps the same)
    pipeline: OnPolicy = field(default_factory=OnPolicy)  # how a step's batch is sampled and audited (pipeline.mode)


@dataclass
class StepSignal:
    """What a baseline's audit slot hands its backward (OmniOPD's counterpart is ``audit.AuditResult``).
    Both carry ``metrics`` (logged) and ``records`` (appended to ``audits.jsonl``)."""

    metrics: dict[str, float] = field(default_factory=dict)
    records: list[dict] = field(default_factory=list)  # for audits.jsonl: none for the baselines
    advantages: torch.Tensor | None = None  # grpo: (B,) group-relative advantages
    teacher_batch: SequenceBatch | None = None  # opd: [teacher prompt | the student's response ids]
    spans: list | None = None  # opd with another tokenizer: per response its spans (core.spans.Span), or None


class Signal(Protocol):
    """What an audit slot returns: ``metrics`` (logged) and ``records`` (appended to ``audits.jsonl``), plus
    whatever the method's ``loss_inputs`` reads (``StepSignal``; OmniOPD's ``audit.AuditResult``)."""

    metrics: dict[str, float]
    records: list[dict]


S = TypeVar("S", bound=Signal)
LossSpec = tuple[str, dict[str, Any]]  # a registered loss (``core.losses.LOSSES``) and its options


def _no_prepare(state: TrainState) -> None:
    pass


def _no_departures(cfg: RunConfig) -> list[str]:
    return []


def _applicable(cfg: RunConfig) -> str | None:
    return None


def _no_totals(totals: dict[str, float], metrics: dict[str, float]) -> None:
    pass


def _always_update(state: TrainState, signal: Any) -> dict[str, float] | None:
    return None


@dataclass(frozen=True)
class Method(Generic[S]):
    """One training method: what it puts in each slot of the trainer's loop, and what it tells the trainer's
    setup and ``omniopd compare`` about itself. The first seven slots are required; the rest default to
    "nothing to add". The trainer owns the micro-batch loop, the normaliser (sequences in the step) and the
    backward pass (``trainer.backward_phase``); a method turns each micro-batch into per-token signals."""

    name: str
    sample: Callable[[TrainState, list[Example]], Rollouts]  # the step's sequences (on-policy: the student's own)
    # the learning signal of those sequences (metrics, audit records, targets); pipelined (pipeline.mode:
    # one_step), it runs in a worker thread on a snapshot of the state while the next batch is sampled
    audit: Callable[[TrainState, Rollouts, list[Example]], S]
    loss: Callable[[RunConfig], LossSpec]  # the registered loss this config trains with, and its options
    # one micro-batch (its indices in the step's batch, on the training device) -> the loss's inputs; runs the
    # student's forward (and the reference's or the teacher's where the loss needs them)
    loss_inputs: Callable[[TrainState, list[int], SequenceBatch, S], LossInputs]
    teacher_role: Callable[[RunConfig], TeacherRole | None]  # None: no teacher is built
    on_policy: bool  # trains on the student's own samples (logs rollout/*; rollout settings apply)
    prepare: Callable[[TrainState], None] = _no_prepare  # at setup, after the teacher is built
    departures: Callable[[RunConfig], list[str]] = _no_departures  # what the config changes from the usual form
    labels: Callable[[RunConfig], list[str]] = _no_departures  # settings a results row names beside them
    not_applicable: Callable[[RunConfig], str | None] = _applicable  # why this config cannot run, or None
    accumulate: Callable[[dict[str, float], dict[str, float]], None] = _no_totals  # (totals, step metrics)
    # the step's metrics when it cannot change the weights (no backward at all), else None
    skip_update: Callable[[TrainState, S], dict[str, float] | None] = _always_update

    def uses_teacher(self, cfg: RunConfig) -> bool:
        return self.teacher_role(cfg) is not None


class NoTeacher(Teacher):
    """Stands in where a method needs no teacher (grpo, sft from references)."""

    name = "none"

    def continue_prefixes(self, requests, spec):
        raise TeacherError("this method runs without a teacher")


# ---------------------------------------------------------------------------------------------- shared slots


def sample_on_policy(state: TrainState, examples: list[Example]) -> Rollouts:
    """The student's own samples of this step's prompts (``rollout.*``), packed [prompt | response]."""
    r = state.cfg.rollout
    prompts = chat_prompts(state.tokenizer, [student_messages(ex.question, ex.instruction) for ex in examples])
    model = state.accelerator.unwrap_model(state.model)
    return sample_rollouts_as(model, state.tokenizer, prompts, r)


def micro_batches(state: TrainState, batch: SequenceBatch) -> Iterator[tuple[list[int], SequenceBatch]]:
    """(indices, that slice of ``batch`` on the training device) per ``optim.micro_batch_size`` sequences, in order."""
    B, size = batch.response_ids.shape[0], state.cfg.optim.micro_batch_size
    for i in range(0, B, size):
        idx = list(range(i, min(B, i + size)))
        yield idx, batch.select(idx).to(state.accelerator.device)


def response_ids(rollouts: Rollouts) -> list[list[int]]:
    """Each trajectory's response token ids, without padding."""
    return [rollouts.batch.response_ids[b, :L].tolist() for b, L in enumerate(rollouts.lengths)]


def sampling_departures(cfg: RunConfig) -> list[str]:
    """An on-policy method's sampling settings that depart from plain sampling."""
    out = []
    if cfg.rollout.temperature < 1:
        out.append(f"rollout temperature {cfg.rollout.temperature:g} < 1 (departure)")
    if cfg.rollout.top_p < 1:
        out.append(f"rollout top_p {cfg.rollout.top_p:g} < 1 (departure)")
    return out

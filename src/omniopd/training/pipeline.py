"""How a step's batch is sampled and audited: on-policy, or one step off-policy with the teacher overlapped.

``pipeline.mode: off`` (the default, the paper's setting, :class:`OnPolicy`): a step draws its prompts,
samples them with the current weights, then audits the samples; the student is idle while the teacher's
requests are in flight.

``pipeline.mode: one_step`` (a departure, :class:`OneStepOffPolicy`; like the one-step asynchronous levels
of PRIME-RL and AReaL): step t's audit runs in a worker thread while the main thread draws and samples step
t+1's prompts with the weights from before step t's update. So the rollouts trained at step t+1 are at most
one step stale: ``pipeline/staleness`` is logged every step (0 at the first step, which samples its own batch
first, 1 after). Also logged: ``time/rollout_s`` (the seconds this step spent sampling: the next batch, and at
the first step its own as well), ``time/audit_s`` (the audit's wall seconds), ``time/teacher_wait_s`` (the
seconds the student waited for the audit after its sampling was done) and ``time/overlap_s`` (the audit's
seconds that ran beside the sampling). The last step samples nothing ahead.

What the pipelined step keeps exact:

- the audit reads the entropy and log-probs of the distribution each token was drawn from: the rollout
  records them while sampling; where it cannot (a checkpoint whose generation config adds its own logits
  processors), they are computed by a forward right after sampling, on the main thread, before the weights
  change (:func:`sample_batch`), never by the audit after the update;
- the worker shares nothing the main thread changes: it gets a view of the train state with its own copy of
  the tokenizer (a fast tokenizer must not be used from two threads at once) and the step number as it was;
  the teacher, phi and the audit's seeded generators are used by the worker alone while it runs;
- resume: a checkpoint holds the pre-sampled batch (``pipeline.pt``: the packed rollouts, the weights step
  that sampled them, and the prompt stream's position before they were drawn, from which the prompts are
  drawn again on restore) besides the RNG states, taken after that sampling. A run killed and resumed ends
  where an uninterrupted pipelined run does. (Resuming a finished run with a larger ``max_steps`` has no
  batch sampled ahead: its first new step samples on-policy, staleness 0.)

Refused (one line each, :func:`check`): a method whose teacher does not write text for an on-policy audit
(sft, opd, grpo: there is no text teacher's requests to overlap); an in-process teacher (``local``,
``privileged``): it runs its model on the student's cores or device, so nothing is gained, and it reseeds
torch's global random state while sampling (``teachers.local``), which the student's sampling beside it draws
from; more than one process: the worker thread would run beside collectives of the main thread (FSDP2's
all-gathers during sampling), and collectives must be issued from one thread in one order on every rank.
"""

from __future__ import annotations

import concurrent.futures
import copy
import dataclasses
import time
from typing import TYPE_CHECKING, Any

from omniopd.config import API_TEACHER_TYPES, RunConfig
from omniopd.engine.alignment import SequenceBatch
from omniopd.engine.rollout import Rollouts
from omniopd.errors import ConfigError, OmniOPDError
from omniopd.methods.base import OnPolicy, SampledBatch, sample_batch

if TYPE_CHECKING:
    from omniopd.methods.base import Method, TrainState


def check(cfg: RunConfig, method: Method, processes: int) -> None:
    """Refuse, with one line, a pipelined run that cannot overlap its teacher safely."""
    if cfg.pipeline.mode == "off":
        return
    role = method.teacher_role(cfg)
    if role != "text" or not method.on_policy:
        raise ConfigError(
            f"pipeline.mode=one_step overlaps a text teacher's audit with on-policy sampling: method={cfg.method} "
            f"has no such audit (teacher role {role}); use pipeline.mode=off"
        )
    if cfg.teacher.type not in API_TEACHER_TYPES:
        raise ConfigError(
            f"pipeline.mode=one_step needs an API teacher (teacher.type one of {', '.join(sorted(API_TEACHER_TYPES))}), "
            f"got teacher.type={cfg.teacher.type}: an in-process teacher runs on the student's own cores or device and "
            "reseeds torch's global random state beside the sampling; use pipeline.mode=off"
        )
    if processes > 1:
        raise ConfigError(
            f"pipeline.mode=one_step runs with one process, got {processes}: its audit thread would run beside the "
            "main thread's collectives; use pipeline.mode=off"
        )


def _timed(fn, *args) -> tuple[Any, float, float]:
    t0 = time.perf_counter()
    out = fn(*args)
    return out, t0, time.perf_counter()


class OneStepOffPolicy(OnPolicy):
    """``pipeline.mode: one_step``: this step's audit in a worker thread, the next step's sampling beside it."""

    def __init__(self, tokenizer) -> None:
        self.pending: SampledBatch | None = None  # sampled during the previous step, for this one
        self._tokenizer = copy.deepcopy(tokenizer)  # the worker's own
        self._worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="omniopd-audit")

    def next_batch(self, state: TrainState, method: Method) -> SampledBatch:
        sampled, self.pending = self.pending, None
        if sampled is None:  # the first step: nothing was sampled ahead
            sampled = sample_batch(state, method, token_stats=True)
        else:
            sampled.metrics = {"time/rollout_s": 0.0}  # its sampling was logged by the step that did it
        sampled.metrics["pipeline/staleness"] = float(state.step - sampled.policy_step)
        return sampled

    def audit(self, state: TrainState, method: Method, sampled: SampledBatch) -> Any:
        view = dataclasses.replace(state, tokenizer=self._tokenizer)  # a snapshot: the step as it is now
        future = self._worker.submit(_timed, method.audit, view, sampled.rollouts, sampled.examples)
        s_start = s_end = time.perf_counter()
        try:
            if state.step + 1 < state.cfg.max_steps:  # a next step exists: sample its batch now, beside the audit
                self.pending = sample_batch(state, method, token_stats=True)
                sampled.metrics["time/rollout_s"] += self.pending.seconds
        finally:
            s_end = time.perf_counter()
            concurrent.futures.wait([future])  # an error while sampling is raised once the audit has finished
        wait_s = time.perf_counter() - s_end
        signal, a_start, a_end = future.result()  # the audit's own error (e.g. TeacherError) is raised here
        sampled.metrics.update(
            {
                "time/audit_s": a_end - a_start,
                "time/teacher_wait_s": wait_s,
                "time/overlap_s": max(0.0, min(a_end, s_end) - max(a_start, s_start))
                if self.pending is not None
                else 0.0,
            }
        )
        return signal

    def state_dict(self) -> dict | None:
        """The batch sampled ahead (None at the last step): the packed rollouts as tensors and plain lists, the
        weights step that sampled them, and the stream position from which their prompts are drawn again."""
        p = self.pending
        if p is None:
            return None
        r = p.rollouts
        return {
            "policy_step": p.policy_step,
            "stream_state": p.stream_state,
            "example_ids": [ex.id for ex in p.examples],
            "input_ids": r.batch.input_ids,
            "attention_mask": r.batch.attention_mask,
            "prompt_len": r.batch.prompt_len,
            "response_mask": r.batch.response_mask,
            "example_index": r.example_index,
            "lengths": r.lengths,
            "finished": r.finished,
            "entropy": r.entropy,
            "logprobs": r.logprobs,
            "metrics": r.metrics,
        }

    def load_state_dict(self, saved: dict | None, state: TrainState) -> None:
        if saved is None:
            self.pending = None
            return
        stream = copy.copy(state.stream)  # the run's own stream is already past these prompts
        stream.load_state_dict(saved["stream_state"])
        examples = stream.next_batch()
        acc = state.accelerator
        if acc.num_processes > 1:
            from omniopd.training.distributed import rank_slice

            examples = rank_slice(examples, acc.process_index, acc.num_processes)
        if [ex.id for ex in examples] != saved["example_ids"]:
            raise OmniOPDError(
                "the checkpoint's pre-sampled batch does not match the training prompts "
                f"({saved['example_ids'][:3]} saved, {[ex.id for ex in examples][:3]} drawn again)"
            )
        P = int(saved["prompt_len"])
        ids = saved["input_ids"]
        batch = SequenceBatch(
            input_ids=ids,
            attention_mask=saved["attention_mask"],
            prompt_len=P,
            response_ids=ids[:, P:],
            response_mask=saved["response_mask"],
        )
        rollouts = Rollouts(
            batch=batch,
            example_index=list(saved["example_index"]),
            lengths=list(saved["lengths"]),
            finished=list(saved["finished"]),
            entropy=saved["entropy"],
            logprobs=saved["logprobs"],
            metrics=dict(saved["metrics"]),
        )
        self.pending = SampledBatch(examples, rollouts, int(saved["policy_step"]), dict(saved["stream_state"]), 0.0)

    def close(self) -> None:
        self._worker.shutdown(wait=True, cancel_futures=True)


def make_pipeline(cfg: RunConfig, tokenizer) -> OnPolicy:
    """The run's pipeline (``pipeline.mode``); :func:`check` has refused what cannot be pipelined."""
    return OneStepOffPolicy(tokenizer) if cfg.pipeline.mode == "one_step" else OnPolicy()

"""The baselines in the same harness as OmniOPD: SFT, white-box OPD and GRPO (ALGORITHM.md "Baselines").

Every method runs through the trainer's one loop, ``sample -> audit -> loss/backward -> step -> log``,
with the same prompt stream, optimizer, logging and evaluation. A :class:`Method` says what it puts in
each slot; the loss math is ``core.baselines`` (pure functions, tested against exact values):

- **sft**: the "sample" is the target solution of each prompt, off-policy: written once by the
  configured teacher (it continues an empty answer; greedy by default; cached on disk) or the dataset's
  reference (``sft.source``); one target per prompt. Loss: NLL of the target tokens / #sequences.
- **opd**: on-policy student samples; the "audit" packs the teacher's own prompt (privileged: with the
  reference solution) followed by the student's response *token ids*, so teacher position t scores
  exactly the token the student produced at t. Needs an in-process teacher with the student's
  tokenizer, refused at setup otherwise (``config.OPD_TEACHER_TYPE_ERROR``, ``OPD_TOKENIZER_ERROR``).
  ``opd.estimator``: ``sampled`` (advantage log q - log p, Tinker) or ``full`` (exact KL, GKD).
- **grpo**: ``rollout.samples_per_prompt`` samples per prompt form a group; the "audit" grades each
  answer (math: math-verify, reward 1 if correct; code: the prompt's unit tests in the isolated
  sandbox, reward the share passed, ``grpo.code_reward``) and computes group-relative advantages. One update per
  batch, so p_old = p_theta (ratio 1). ``grpo.kl_coef`` adds the exact KL(p_theta || p_ref).

Metric keys are shared where they apply: ``loss/total`` for all, ``rollout/*`` for on-policy methods
only (SFT logs ``sft/*`` about its targets instead), ``teacher/tokens`` and ``teacher/requests`` for the
teacher's work (SFT: the tokens of the solutions used, counted even when read from the cache; OPD: the
tokens of the teacher's forward passes), ``audit/*`` only for OmniOPD.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from omniopd.alignment import SequenceBatch, response_hidden
from omniopd.config import OPD_TOKENIZER_ERROR, RunConfig
from omniopd.core import token_stats
from omniopd.core.baselines import (
    GRPOInputs,
    OPDFullInputs,
    OPDSampledInputs,
    SFTLossInputs,
    group_advantages,
    grpo_loss,
    opd_full_loss,
    opd_sampled_loss,
    reverse_kl_sliced,
    sft_loss,
)
from omniopd.data import Example, PromptStream
from omniopd.errors import ConfigError, DataError, TeacherError
from omniopd.measures import clean_reference
from omniopd.prompts import student_messages
from omniopd.rollout import Rollouts, chat_prompts, pack
from omniopd.teachers.base import ContinuationRequest, SamplingSpec, Teacher


@dataclass
class TrainState:
    """Everything a training step reads and updates (built by ``trainer.setup``)."""

    cfg: RunConfig
    accelerator: object
    model: torch.nn.Module
    ref_model: torch.nn.Module
    tokenizer: object
    teacher: Teacher
    optimizer: torch.optim.Optimizer
    scheduler: object
    stream: PromptStream
    out_dir: Path
    loggers: object = None
    step: int = 0
    totals: dict[str, float] = field(default_factory=dict)
    extras: dict = field(default_factory=dict)  # method-specific state built at setup (SFT targets)



@dataclass
class StepSignal:
    """What a baseline's audit slot hands its backward (OmniOPD's counterpart is ``AuditResult``)."""

    metrics: dict[str, float] = field(default_factory=dict)
    records: list[dict] = field(default_factory=list)  # for audits.jsonl: none for the baselines
    advantages: torch.Tensor | None = None  # grpo: (B,) group-relative advantages
    teacher_batch: SequenceBatch | None = None  # opd: [teacher prompt | the student's response ids]


SampleFn = Callable[["TrainState", list[Example]], Rollouts]
AuditFn = Callable[["TrainState", Rollouts, list[Example]], Any]
BackwardFn = Callable[["TrainState", SequenceBatch, Any], dict[str, float]]
PrepareFn = Callable[["TrainState"], None]


def _text_teacher(cfg: RunConfig) -> str | None:
    return "text"


@dataclass(frozen=True)
class Method:
    """One training method's slots in the trainer's loop."""

    backward: BackwardFn
    sample: SampleFn | None = None  # None: on-policy student sampling (trainer.sample_phase)
    audit: AuditFn | None = None  # None: the OmniOPD audit (trainer.audit_phase)
    prepare: PrepareFn | None = None  # at setup, after the teacher is built: checks and one-off work
    # what the teacher does: "text" (audit continuations; preflighted), "solutions" (SFT targets),
    # "logits" (white-box OPD), or None (no teacher is built)
    teacher_role: Callable[[RunConfig], str | None] = _text_teacher
    on_policy: bool = True  # log rollout/* (the student's own samples)


class NoTeacher(Teacher):
    """Stands in where a method needs no teacher (grpo, sft from references)."""

    name = "none"

    def continue_prefixes(self, requests, spec):
        raise TeacherError("this method runs without a teacher")


def _micro_batches(B: int, size: int):
    for i in range(0, B, size):
        yield list(range(i, min(B, i + size)))


# ---------------------------------------------------------------------------------------------- omniopd


def omniopd_prepare(state: "TrainState") -> None:
    """Resolve phi at setup, so a missing embedding model fails before any rollout."""
    from omniopd.audit import phi_by_name

    phi_by_name(state.cfg.audit.phi)


# ---------------------------------------------------------------------------------------------- sft


@dataclass(frozen=True)
class SFTTarget:
    text: str
    finished: bool  # the writer ended it (EOS); a target cut at max_new_tokens gets no EOS
    teacher_tokens: int = 0  # prompt + completion tokens the teacher spent on it (0 for references)


def visited_examples(examples: list[Example], cfg: RunConfig) -> list[Example]:
    """The prompts a run of ``cfg.max_steps`` steps will see, in order (a fresh copy of its stream)."""
    from omniopd.data import PromptStream

    stream = PromptStream(examples, cfg.optim.prompts_per_step, cfg.seed, cfg.data.shuffle)
    seen: dict[str, Example] = {}
    for _ in range(cfg.max_steps):
        for ex in stream.next_batch():
            seen.setdefault(_example_key(ex), ex)
    return list(seen.values())


def _example_key(ex: Example) -> str:
    return hashlib.sha256(json.dumps([ex.id, ex.question, ex.reference]).encode()).hexdigest()[:20]


def sft_cache_path(cfg: RunConfig, teacher: Teacher) -> Path:
    from omniopd.models import cache_dir
    from omniopd.prompts import ANSWER_INSTRUCTION

    root = Path(cfg.sft.cache_dir) if cfg.sft.cache_dir else cache_dir() / "sft-solutions"
    spec = {
        "teacher": teacher.name, "type": cfg.teacher.type, "model": cfg.teacher.model, "privileged": cfg.teacher.privileged,
        "temperature": cfg.sft.temperature, "top_p": cfg.teacher.top_p, "max_new_tokens": cfg.sft.max_new_tokens,
        "seed": cfg.seed, "instruction": ANSWER_INSTRUCTION,
    }
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    return root / f"{key}.jsonl"


def _read_cache(path: Path) -> dict[str, SFTTarget]:
    out: dict[str, SFTTarget] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
                out[row["key"]] = SFTTarget(row["text"], bool(row["finished"]), int(row["teacher_tokens"]))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                break  # a line cut by a kill ends the usable cache; the rest is generated again
    return out


def teacher_solutions(cfg: RunConfig, teacher: Teacher, examples: list[Example]) -> dict[str, SFTTarget]:
    """One teacher-written solution per example, read from the cache or generated (and appended) once."""
    path = sft_cache_path(cfg, teacher)
    cached = _read_cache(path)
    missing = [ex for ex in examples if _example_key(ex) not in cached]
    if missing:
        tqdm.write(f"omniopd: sft: the teacher writes {len(missing)} solutions (once; cached in {path})")
        spec = SamplingSpec(n=1, max_new_tokens=cfg.sft.max_new_tokens, temperature=cfg.sft.temperature,
                            top_p=cfg.teacher.top_p, seed=cfg.seed)
        requests = [ContinuationRequest(question=ex.question, prefix="", reference=ex.reference, trajectory=i,
                                        instruction=ex.instruction)
                    for i, ex in enumerate(missing)]
        results = teacher.continue_prefixes(requests, spec)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as fh:
            for ex, res in zip(missing, results, strict=True):
                if not res.ok or len(res.texts) != 1:
                    raise TeacherError(f"sft: the teacher failed to write a solution for {ex.id}: {res.error or 'no text'}")
                # a completion shorter than the limit ended on EOS (the local teachers stop there)
                target = SFTTarget(res.texts[0], res.completion_tokens < spec.max_new_tokens, res.prompt_tokens + res.completion_tokens)
                cached[_example_key(ex)] = target
                fh.write(json.dumps({"key": _example_key(ex), "id": ex.id, "text": target.text, "finished": target.finished,
                                     "teacher_tokens": target.teacher_tokens}) + "\n")
    return {_example_key(ex): cached[_example_key(ex)] for ex in examples}


def sft_prepare(state: "TrainState") -> None:
    cfg = state.cfg
    examples = visited_examples(state.stream.examples, cfg)
    if cfg.sft.source == "reference":
        no_ref = [ex.id for ex in examples if not ex.reference]
        if no_ref:
            raise DataError(f"sft.source=reference needs reference solutions; {cfg.data.train} has none for {no_ref[0]} ({len(no_ref)} prompts)")
        targets = {_example_key(ex): SFTTarget(clean_reference(ex.reference), True) for ex in examples}
    else:
        targets = teacher_solutions(cfg, state.teacher, examples)
    state.extras["sft_targets"] = targets
    with (state.out_dir / "sft_solutions.jsonl").open("w", encoding="utf-8") as fh:
        for ex in examples:
            t = targets[_example_key(ex)]
            fh.write(json.dumps({"id": ex.id, "source": cfg.sft.source, "text": t.text, "finished": t.finished}) + "\n")


def sft_sample(state: "TrainState", examples: list[Example]) -> Rollouts:
    """The target solutions of this step's prompts as a packed batch: [student prompt | target tokens]."""
    tok, cap = state.tokenizer, state.cfg.sft.max_new_tokens
    targets: dict[str, SFTTarget] = state.extras["sft_targets"]
    prompts = chat_prompts(tok, [student_messages(ex.question, ex.instruction) for ex in examples])
    responses, finished = [], []
    for ex in examples:
        t = targets[_example_key(ex)]
        ids = tok.encode(t.text, add_special_tokens=False)
        done = t.finished and len(ids) < cap  # cut at the cap (in student tokens): no EOS after a cut
        responses.append(ids[:cap] + ([tok.eos_token_id] if done else []))
        finished.append(done)
    batch = pack(tok, prompts, responses, tok.pad_token_id)
    return Rollouts(batch=batch, example_index=list(range(len(examples))), lengths=[len(r) for r in responses], finished=finished)


def sft_audit(state: "TrainState", rollouts: Rollouts, examples: list[Example]) -> StepSignal:
    targets: dict[str, SFTTarget] = state.extras["sft_targets"]
    used = [targets[_example_key(ex)] for ex in examples]
    from_teacher = state.cfg.sft.source == "teacher"
    n = len(rollouts.lengths)
    return StepSignal(metrics={
        "sft/target_mean_length": sum(rollouts.lengths) / max(n, 1),
        "sft/target_truncated_frac": 1.0 - sum(rollouts.finished) / max(n, 1),
        "teacher/tokens": float(sum(t.teacher_tokens for t in used)),
        "teacher/requests": float(len(used)) if from_teacher else 0.0,
    })


def sft_backward(state: "TrainState", batch: SequenceBatch, signal: StepSignal) -> dict[str, float]:
    """NLL of the target tokens, micro-batched, divided by the number of sequences in the step."""
    cfg, device = state.cfg, state.accelerator.device
    B = batch.response_ids.shape[0]
    loss_sum = nll_sum = n_tok = 0.0
    for idx in _micro_batches(B, cfg.optim.micro_batch_size):
        sub = batch.select(idx).to(device)
        hidden, head = response_hidden(state.model, sub)
        stats = token_stats(hidden, head, sub.response_ids, slice_size=cfg.loss.slice_size)
        out = sft_loss(SFTLossInputs(student_logprobs=stats.logprobs, target_mask=sub.response_mask), normalizer=float(B))
        state.accelerator.backward(out.loss)
        loss_sum += out.metrics["loss/sft"]
        nll_sum += out.metrics["sft/nll_per_token"] * out.metrics["tokens/target"]
        n_tok += out.metrics["tokens/target"]
    return {"loss/total": loss_sum, "loss/sft": loss_sum, "sft/nll_per_token": nll_sum / max(n_tok, 1.0), "sft/target_tokens": n_tok}


# ---------------------------------------------------------------------------------------------- opd


def check_white_box_teacher(teacher: Teacher, student_tokenizer, student_model) -> None:
    """Refuse a teacher whose log-probabilities cannot be read token for token against the student's."""
    from omniopd.config import OPD_TEACHER_TYPE_ERROR
    from omniopd.teachers.local import LocalTeacher

    if not isinstance(teacher, LocalTeacher):
        raise ConfigError(OPD_TEACHER_TYPE_ERROR.format(type=teacher.name.split(":")[0]))
    t_vocab, s_vocab = teacher.tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if t_vocab != s_vocab:
        detail = (f"{len(t_vocab)} tokens vs the student's {len(s_vocab)}" if len(t_vocab) != len(s_vocab)
                  else f"the same size, {len(s_vocab)} tokens, with different ids")
        raise ConfigError(OPD_TOKENIZER_ERROR.format(teacher=teacher.name, detail=detail))
    t_head = teacher.model.get_output_embeddings().weight.shape[0]
    s_head = student_model.get_output_embeddings().weight.shape[0]
    if t_head != s_head:
        detail = f"output heads of {t_head} and {s_head} rows"
        raise ConfigError(OPD_TOKENIZER_ERROR.format(teacher=teacher.name, detail=detail))


def opd_prepare(state: "TrainState") -> None:
    check_white_box_teacher(state.teacher, state.tokenizer, state.accelerator.unwrap_model(state.model))


def teacher_scoring_batch(teacher, examples: list[Example], responses: list[list[int]]) -> SequenceBatch:
    """[the teacher's own prompt (privileged: with the reference) | the student's response token ids]."""
    prompts = [teacher.prompt_text(ContinuationRequest(question=ex.question, prefix="", reference=ex.reference,
                                                     instruction=ex.instruction)) for ex in examples]
    return pack(teacher.tokenizer, prompts, responses, teacher.tokenizer.pad_token_id)


def _responses(rollouts: Rollouts) -> list[list[int]]:
    return [rollouts.batch.response_ids[b, :L].tolist() for b, L in enumerate(rollouts.lengths)]


def opd_audit(state: "TrainState", rollouts: Rollouts, examples: list[Example]) -> StepSignal:
    traj_examples = [examples[i] for i in rollouts.example_index]
    tbatch = teacher_scoring_batch(state.teacher, traj_examples, _responses(rollouts))
    return StepSignal(
        metrics={"teacher/tokens": float(tbatch.attention_mask.sum()), "teacher/requests": float(len(traj_examples))},
        teacher_batch=tbatch,
    )


def opd_backward(state: "TrainState", batch: SequenceBatch, signal: StepSignal) -> dict[str, float]:
    """Reverse KL(student || teacher) on the student's own tokens, micro-batched, / #sequences."""
    cfg, device = state.cfg, state.accelerator.device
    teacher_model = state.teacher.model
    B = batch.response_ids.shape[0]
    loss_sum = kl_tok_sum = n_tok = 0.0
    for idx in _micro_batches(B, cfg.optim.micro_batch_size):
        sub = batch.select(idx).to(device)
        tsub = signal.teacher_batch.select(idx).to(device)
        same = tsub.response_mask.shape == sub.response_mask.shape and torch.equal(tsub.response_mask, sub.response_mask)
        if not same or not torch.equal(tsub.response_ids[sub.response_mask], sub.response_ids[sub.response_mask]):
            raise RuntimeError("opd: teacher and student sequences do not hold the same response tokens")
        hidden, head = response_hidden(state.model, sub)
        with torch.no_grad():
            t_hidden, t_head = response_hidden(teacher_model, tsub)
        if cfg.opd.estimator == "sampled":
            stats = token_stats(hidden, head, sub.response_ids, slice_size=cfg.loss.slice_size)
            with torch.no_grad():
                t_logp = token_stats(t_hidden, t_head, tsub.response_ids, slice_size=cfg.loss.slice_size).logprobs
            out = opd_sampled_loss(OPDSampledInputs(stats.logprobs, t_logp, sub.response_mask), normalizer=float(B))
        else:
            kl = reverse_kl_sliced(hidden, head, t_hidden, t_head, slice_size=cfg.loss.slice_size)
            out = opd_full_loss(OPDFullInputs(reverse_kl=kl, response_mask=sub.response_mask), normalizer=float(B))
        state.accelerator.backward(out.loss)
        loss_sum += out.metrics["loss/opd"]
        kl_tok_sum += out.metrics["opd/reverse_kl_mean"] * out.metrics["tokens/response"]
        n_tok += out.metrics["tokens/response"]
    return {"loss/total": loss_sum, "loss/opd": loss_sum, "opd/reverse_kl_mean": kl_tok_sum / max(n_tok, 1.0)}


# ---------------------------------------------------------------------------------------------- grpo


def correctness_reward(example: Example, text: str, code_reward: str = "fraction",
                       insecure_no_isolation: bool = False) -> float:
    """Math: 1.0 when the answer extracted from ``text`` equals the example's final answer (math-verify),
    else 0.0. Code (an example with unit tests): the share of its tests the extracted code passes
    (``code_reward="fraction"``), or 1.0 only when all pass (``"all"``), graded as evaluation grades
    (:func:`omniopd.evaluation.code.grade_tests`: the verdict is decided outside the code's process)."""
    if example.tests is not None:
        from omniopd.evaluation.code import grade_tests

        t = example.tests
        g = grade_tests(text, t.asserts, setup=[*t.imports, t.setup_code], reference=example.reference,
                        insecure_no_isolation=insecure_no_isolation)
        return g.fraction if code_reward == "fraction" else float(g.passed)
    from omniopd.evaluation.mathgrade import answers_match, extract_answer

    return float(answers_match(example.answer, extract_answer(text).answer))


def grpo_prepare(state: "TrainState") -> None:
    """Code prompts are graded in the isolated sandbox: refuse at setup, not at the first step, when it is
    unavailable (unless ``eval.insecure_no_isolation``)."""
    if any(ex.tests is not None for ex in state.stream.examples):
        from omniopd.evaluation.code import check_isolation

        check_isolation(state.cfg.eval.insecure_no_isolation)


def grpo_audit(state: "TrainState", rollouts: Rollouts, examples: list[Example]) -> StepSignal:
    from omniopd.evaluation.sandbox import parallel_map

    G, cfg = state.cfg.rollout.samples_per_prompt, state.cfg
    texts = [state.tokenizer.decode(r, skip_special_tokens=True) for r in _responses(rollouts)]
    pairs = list(zip(rollouts.example_index, texts, strict=True))

    def reward(pair: tuple[int, str]) -> float:
        ex, text = examples[pair[0]], pair[1]
        if ex.tests is None:
            return correctness_reward(ex, text)
        return correctness_reward(ex, text, cfg.grpo.code_reward, cfg.eval.insecure_no_isolation)

    values = parallel_map(reward, pairs)
    rewards = torch.tensor(values, dtype=torch.float32)
    adv = group_advantages(rewards, G, normalize_std=cfg.grpo.normalize_std)
    groups = rewards.view(-1, G)
    return StepSignal(
        metrics={
            "rollout/reward_mean": float(rewards.mean()),
            "rollout/all_correct_frac": float((rewards == 1.0).float().mean()),
            "grpo/groups_with_signal": float((groups != groups[:, :1]).any(-1).float().mean()),
            "teacher/tokens": 0.0,
            "teacher/requests": 0.0,
        },
        advantages=adv,
    )


def grpo_backward(state: "TrainState", batch: SequenceBatch, signal: StepSignal) -> dict[str, float]:
    """PPO-clipped group-relative surrogate (+ kl_coef * KL(p_theta || p_ref)), micro-batched, / #sequences."""
    cfg, device = state.cfg, state.accelerator.device
    B = batch.response_ids.shape[0]
    want_kl = cfg.grpo.kl_coef > 0
    if not want_kl and not bool(signal.advantages.abs().gt(0).any()) and state.accelerator.num_processes == 1:
        # every group is flat (all right or all wrong): the loss is exactly 0 and so is its gradient (with
        # several processes every rank runs the backward, since the gradient all-reduce is collective)
        return {"loss/total": 0.0, "loss/grpo": 0.0, "grpo/skipped_flat_batch": 1.0}
    loss_sum = kl_tok_sum = n_tok = 0.0
    for idx in _micro_batches(B, cfg.optim.micro_batch_size):
        sub = batch.select(idx).to(device)
        hidden, head = response_hidden(state.model, sub)
        stats = token_stats(hidden, head, sub.response_ids, slice_size=cfg.loss.slice_size)
        ref_kl = None
        if want_kl:
            with torch.no_grad():
                ref_hidden, ref_head = response_hidden(state.ref_model, sub)
            ref_kl = reverse_kl_sliced(hidden, head, ref_hidden, ref_head, slice_size=cfg.loss.slice_size)
        out = grpo_loss(
            GRPOInputs(student_logprobs=stats.logprobs, old_logprobs=stats.logprobs.detach(),  # one update per batch
                       advantages=signal.advantages[idx].to(device), response_mask=sub.response_mask, ref_kl=ref_kl),
            normalizer=float(B), clip_eps=cfg.grpo.clip_eps, kl_coef=cfg.grpo.kl_coef,
        )
        state.accelerator.backward(out.loss)
        loss_sum += out.metrics["loss/grpo"]
        n_tok += out.metrics["tokens/response"]
        kl_tok_sum += out.metrics.get("grpo/ref_kl_mean", 0.0) * out.metrics["tokens/response"]
    metrics = {"loss/total": loss_sum, "loss/grpo": loss_sum, "grpo/skipped_flat_batch": 0.0}
    if want_kl:
        metrics["grpo/ref_kl_mean"] = kl_tok_sum / max(n_tok, 1.0)
    return metrics


BASELINES: dict[str, Method] = {
    "sft": Method(
        backward=sft_backward, sample=sft_sample, audit=sft_audit, prepare=sft_prepare,
        teacher_role=lambda cfg: "solutions" if cfg.sft.source == "teacher" else None, on_policy=False,
    ),
    "opd": Method(backward=opd_backward, audit=opd_audit, prepare=opd_prepare, teacher_role=lambda cfg: "logits"),
    "grpo": Method(backward=grpo_backward, audit=grpo_audit, prepare=grpo_prepare, teacher_role=lambda cfg: None),
}

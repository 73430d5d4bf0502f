"""White-box on-policy distillation (ALGORITHM.md "Baselines"): reverse KL(student || teacher) on the
student's own samples.

The "audit" packs the teacher's own prompt (privileged: with the reference solution) followed by the
student's response *token ids*, so teacher position t scores exactly the token the student produced at
t. ``opd.estimator``: ``sampled`` (advantage log q - log p, Tinker) or ``full`` (exact KL, GKD).

A teacher with another tokenizer (``sampled`` only). The student's response is decoded (special tokens
dropped) and tokenized by the teacher; the teacher scores those tokens after its own prompt, and a finished
response (one that ended on the student's end-of-turn token) also gets the teacher's end-of-turn token. The two
tokenizations are cut into the coarsest spans where both have a token boundary (``core.spans``), and every
student token of a span takes the span's log-ratio log q_T(span) - log p(span) as its advantage. Summed over a
response that is the sequence-level log-ratio log q_T(text) - log p(text), the same total as the per-token
estimator's; it differs from it in where the credit lands: a token is credited with its span's ratio, not its
own (with one tokenizer every span is one token and the two are the same). A response the teacher's tokenizer
cannot reproduce (``decode(encode(text)) != text``: normalised whitespace, unknown characters) gets no
advantage and is counted (``opd/unaligned``). Logged: ``opd/spans_per_response``, ``opd/student_tokens_per_span``,
the advantages' ``opd/advantage_mean`` and ``opd/advantage_std``, the teacher's ``time/teacher_forward_s``, and what
on-policy distillation is known to suffer from: ``opd/loop_frac`` (responses whose tail repeats itself,
``evaluation.measures.loops``) beside ``rollout/truncated_frac`` (responses that ran to the length limit).

The white-box rule lives here, once: the teacher must be an in-process model (``config.WHITE_BOX_TEACHER_TYPES``;
the config refuses other types with ``config.OPD_TEACHER_TYPE_ERROR``); with ``opd.estimator=full`` its
vocabulary and output head must be the student's (:func:`check_white_box_teacher` at setup,
``config.OPD_TOKENIZER_ERROR``). ``omniopd compare`` reads the same rule before training
(:func:`teacher_tokenizer_differs`, :func:`not_applicable`) and for its reverse-KL column.
"""

from __future__ import annotations

import time

import torch

from omniopd.config import OPD_TEACHER_TYPE_ERROR, OPD_TOKENIZER_ERROR, WHITE_BOX_TEACHER_TYPES, RunConfig
from omniopd.core import LossInputs, reverse_kl_sliced, token_stats
from omniopd.core.spans import Span, common_spans, span_advantages, token_ends
from omniopd.data import Example
from omniopd.engine.alignment import SequenceBatch, response_hidden
from omniopd.engine.rollout import Rollouts, pack
from omniopd.errors import ConfigError
from omniopd.evaluation.measures import loops
from omniopd.methods.base import (
    LossSpec,
    Method,
    StepSignal,
    TeacherRole,
    TrainState,
    response_ids,
    sample_on_policy,
    sampling_departures,
)
from omniopd.teachers.base import ContinuationRequest, Teacher
from omniopd.training.sharding import in_forward

NOT_APPLICABLE = (
    "not applicable: opd.estimator=full needs the teacher's log-probabilities over the student's tokens "
    "(the teacher's tokenizer differs; opd.estimator=sampled aligns the two on the text)"
)


def same_tokenizer(teacher, student_tokenizer) -> bool:
    return teacher.tokenizer.get_vocab() == student_tokenizer.get_vocab()


def check_white_box_teacher(teacher: Teacher, student_tokenizer, student_model, estimator: str = "full") -> None:
    """Refuse a teacher whose log-probabilities cannot be read (not in-process), and, for the exact KL
    (``full``), one whose vocabulary or output head is not the student's."""
    from omniopd.teachers.local import LocalTeacher

    if not isinstance(teacher, LocalTeacher):
        raise ConfigError(OPD_TEACHER_TYPE_ERROR.format(type=teacher.name.split(":")[0]))
    t_vocab, s_vocab = teacher.tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if t_vocab != s_vocab and estimator == "sampled":
        return  # aligned on the text, span by span
    if t_vocab != s_vocab:
        detail = (
            f"{len(t_vocab)} tokens vs the student's {len(s_vocab)}"
            if len(t_vocab) != len(s_vocab)
            else f"the same size, {len(s_vocab)} tokens, with different ids"
        )
        raise ConfigError(OPD_TOKENIZER_ERROR.format(teacher=teacher.name, detail=detail))
    t_head = teacher.model.get_output_embeddings().weight.shape[0]
    s_head = student_model.get_output_embeddings().weight.shape[0]
    if t_head != s_head:
        detail = f"output heads of {t_head} and {s_head} rows"
        raise ConfigError(OPD_TOKENIZER_ERROR.format(teacher=teacher.name, detail=detail))


def teacher_tokenizer_differs(cfg: RunConfig) -> bool:
    """The configured local/privileged teacher's vocabulary differs from the student's, compared as
    :func:`check_white_box_teacher` does; only the two tokenizers are loaded. False for the student's own
    model and for API teachers (they have no vocabulary to compare)."""
    from omniopd.engine.models import load_tokenizer

    t = cfg.teacher
    if t.type not in WHITE_BOX_TEACHER_TYPES or t.model in (None, cfg.student.name):
        return False
    return load_tokenizer(t.model).get_vocab() != load_tokenizer(cfg.student.name).get_vocab()


def not_applicable(cfg: RunConfig) -> str | None:
    """The exact KL (``opd.estimator=full``) reads the teacher's log-probabilities token for token against the
    student's: a teacher with another tokenizer cannot serve it (``sampled`` aligns the two). A teacher that
    cannot be loaded is left to the training run, which reports it."""
    if cfg.opd.estimator == "sampled":
        return None
    try:
        differs = teacher_tokenizer_differs(cfg)
    except Exception:  # noqa: BLE001 - training reports a teacher it cannot load, with its own message
        return None
    return NOT_APPLICABLE if differs else None


def prepare(state: TrainState) -> None:
    check_white_box_teacher(
        state.teacher, state.tokenizer, state.accelerator.unwrap_model(state.model), state.cfg.opd.estimator
    )


def teacher_scoring_batch(teacher, examples: list[Example], responses: list[list[int]]) -> SequenceBatch:
    """[the teacher's own prompt (privileged: with the reference) | the student's response token ids]."""
    prompts = [
        teacher.prompt_text(
            ContinuationRequest(question=ex.question, prefix="", reference=ex.reference, instruction=ex.instruction)
        )
        for ex in examples
    ]
    return pack(teacher.tokenizer, prompts, responses, teacher.tokenizer.pad_token_id)


def audit(state: TrainState, rollouts: Rollouts, examples: list[Example]) -> StepSignal:
    traj_examples = [examples[i] for i in rollouts.example_index]
    student_ids = response_ids(rollouts)
    if same_tokenizer(state.teacher, state.tokenizer):
        tbatch = teacher_scoring_batch(state.teacher, traj_examples, student_ids)
        spans = None
        extra: dict[str, float] = {}
    else:
        teacher_ids, spans, extra = cross_tokenizer_alignment(state.tokenizer, state.teacher, student_ids)
        tbatch = teacher_scoring_batch(state.teacher, traj_examples, teacher_ids)
    metrics = {
        "teacher/tokens": float(tbatch.attention_mask.sum()),
        "teacher/requests": float(len(traj_examples)),
        # what on-policy distillation is known to suffer from: answers that repeat themselves (a periodic tail)
        "opd/loop_frac": sum(loops(str(state.tokenizer.decode(ids, skip_special_tokens=True))) for ids in student_ids)
        / max(len(student_ids), 1),
    }
    return StepSignal(metrics={**metrics, **extra}, teacher_batch=tbatch, spans=spans)


def cross_tokenizer_alignment(
    student_tokenizer, teacher, student_ids: list[list[int]]
) -> tuple[list[list[int]], list[list[Span] | None], dict[str, float]]:
    """Per response: the teacher's token ids of the decoded text (and its end-of-turn token when the student's
    response ended on its own), the spans aligning the two tokenizations (None: the teacher's tokenizer does not
    reproduce the text, no advantage), and the metrics of the alignment."""
    from omniopd.engine.models import eos_token_ids

    s_tok, t_tok = student_tokenizer, teacher.tokenizer
    s_eos = set(s_tok.all_special_ids)
    t_eos = eos_token_ids(teacher.model, t_tok)

    def s_decode(ids: list[int]) -> str:
        return s_tok.decode(ids, skip_special_tokens=True)

    def t_decode(ids: list[int]) -> str:
        return t_tok.decode(ids, skip_special_tokens=True)

    teacher_ids: list[list[int]] = []
    spans: list[list[Span] | None] = []
    n_spans: list[int] = []
    per_span: list[float] = []
    for ids in student_ids:
        text, s_ends = token_ends(s_decode, ids)
        t_ids = list(t_tok(text, add_special_tokens=False)["input_ids"])
        finished = bool(ids) and ids[-1] in s_eos
        if t_decode(t_ids) != text:
            teacher_ids.append(t_ids + (t_eos[:1] if finished else []))
            spans.append(None)
            continue
        _, t_ends = token_ends(t_decode, t_ids)
        if finished:
            t_ids, t_ends = t_ids + t_eos[:1], [*t_ends, len(text)]
        sp = common_spans(s_ends, t_ends, len(text))
        teacher_ids.append(t_ids)
        spans.append(sp)
        n_spans.append(len(sp))
        per_span += [len(x.student) for x in sp]
    metrics = {
        "opd/unaligned": float(sum(x is None for x in spans)),
        "opd/spans_per_response": sum(n_spans) / max(len(n_spans), 1),
        "opd/student_tokens_per_span": sum(per_span) / max(len(per_span), 1),
    }
    return teacher_ids, spans, metrics


def _opd_terms(
    cfg: RunConfig, model, teacher_model, sub: SequenceBatch, tsub: SequenceBatch, clock: dict[str, float]
) -> tuple:
    """``sampled``: (log p(y_t), log q(y_t)); ``full``: (KL(p || q) per token,); each (B, T). Run inside the
    student's forward (``sharding.in_forward``); the teacher's forward seconds are added to ``clock["teacher"]``."""
    hidden, head = response_hidden(model, sub)
    t0 = time.perf_counter()
    with torch.no_grad():
        t_hidden, t_head = response_hidden(teacher_model, tsub)
    clock["teacher"] += time.perf_counter() - t0
    if cfg.opd.estimator == "sampled":
        logp = token_stats(hidden, head, sub.response_ids, slice_size=cfg.loss.slice_size).logprobs
        t0 = time.perf_counter()
        with torch.no_grad():
            t_logp = token_stats(t_hidden, t_head, tsub.response_ids, slice_size=cfg.loss.slice_size).logprobs
        clock["teacher"] += time.perf_counter() - t0
        return logp, t_logp
    return (reverse_kl_sliced(hidden, head, t_hidden, t_head, slice_size=cfg.loss.slice_size),)


def loss(cfg: RunConfig) -> LossSpec:
    return ("opd_sampled" if cfg.opd.estimator == "sampled" else "opd_full"), {}


def loss_inputs(state: TrainState, idx: list[int], sub: SequenceBatch, signal: StepSignal) -> LossInputs:
    """The teacher scores this micro-batch's responses: ``sampled``, each token's advantage log q - log p (another
    tokenizer: its span's log-ratio); ``full``, the exact per-position reverse KL(p || q)."""
    from omniopd.teachers.local import LocalTeacher

    assert isinstance(state.teacher, LocalTeacher)  # prepare (check_white_box_teacher) refuses any other
    assert signal.teacher_batch is not None  # set by audit
    tsub = signal.teacher_batch.select(idx).to(state.accelerator.device)
    if signal.spans is None:
        same = tsub.response_mask.shape == sub.response_mask.shape and torch.equal(
            tsub.response_mask, sub.response_mask
        )
        if not same or not torch.equal(tsub.response_ids[sub.response_mask], sub.response_ids[sub.response_mask]):
            raise RuntimeError("opd: teacher and student sequences do not hold the same response tokens")
    clock = {"teacher": 0.0}
    terms = in_forward(state.model, _opd_terms, state.cfg, state.model, state.teacher.model, sub, tsub, clock)
    extra = {"time/teacher_forward_s": clock["teacher"]}
    if state.cfg.opd.estimator == "full":
        (kl,) = terms
        return LossInputs(response_mask=sub.response_mask, kl=kl, extra=extra)
    logp, t_logp = terms
    valid = sub.response_mask.bool()
    with torch.no_grad():
        if signal.spans is None:
            adv = torch.where(valid, t_logp.detach().to(logp.dtype) - logp.detach(), logp.new_zeros(()))
        else:  # another tokenizer: each student token's advantage is its span's log-ratio
            adv = _span_advantages(logp, t_logp, sub, tsub, [signal.spans[i] for i in idx])
    return LossInputs(logprobs=logp, response_mask=sub.response_mask, advantages=adv, extra=extra)


def _span_advantages(
    logp: torch.Tensor, t_logp: torch.Tensor, sub: SequenceBatch, tsub: SequenceBatch, spans: list
) -> torch.Tensor:
    """(B, T) advantages of the student's tokens: each its span's log-ratio (0 for a response without spans)."""
    adv = torch.zeros_like(logp)
    for r, row_spans in enumerate(spans):
        if row_spans is None:
            continue
        n_s, n_t = int(sub.response_mask[r].sum()), int(tsub.response_mask[r].sum())
        a = span_advantages(row_spans, logp[r, :n_s].tolist(), t_logp[r, :n_t].tolist())
        adv[r, :n_s] = torch.tensor(a, dtype=logp.dtype, device=logp.device)
    return adv


def _logits_teacher(cfg: RunConfig) -> TeacherRole:
    return "logits"


def labels(cfg: RunConfig) -> list[str]:
    return [f"opd estimator {cfg.opd.estimator}"]


OPD = Method(
    name="opd",
    sample=sample_on_policy,
    audit=audit,
    loss=loss,
    loss_inputs=loss_inputs,
    teacher_role=_logits_teacher,
    on_policy=True,
    prepare=prepare,
    departures=sampling_departures,
    labels=labels,
    not_applicable=not_applicable,
)

"""SFT baseline: off-policy, on the same prompts in the same order (ALGORITHM.md "Baselines").

The "sample" is the target solution of each prompt: written once by the configured teacher (it
continues an empty answer; greedy by default; cached on disk) or the dataset's reference
(``sft.source``); one target per prompt, or ``sft.solutions_per_prompt`` sampled ones (a step then trains on
all of them). Loss: NLL of the target tokens / #sequences. It logs ``sft/*``
about its targets instead of ``rollout/*``; ``teacher/tokens`` are the tokens of the solutions used,
counted even when read from the cache.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from omniopd.config import RunConfig
from omniopd.core.losses import LossInputs
from omniopd.data import Example, PromptStream
from omniopd.engine.alignment import SequenceBatch
from omniopd.engine.forward import response_token_stats
from omniopd.engine.prompts import student_messages
from omniopd.engine.rollout import Rollouts, chat_prompts, pack
from omniopd.errors import DataError, TeacherError
from omniopd.evaluation.measures import clean_reference
from omniopd.methods.base import LossSpec, Method, StepSignal, TeacherRole, TrainState
from omniopd.teachers.base import ContinuationRequest, SamplingSpec, Teacher


@dataclass(frozen=True)
class SFTTarget:
    text: str
    finished: bool  # the writer ended it (EOS); a target cut at max_new_tokens gets no EOS
    teacher_tokens: int = 0  # prompt + completion tokens the teacher spent on it (0 for references)


def visited_examples(examples: list[Example], cfg: RunConfig) -> list[Example]:
    """The prompts a run of ``cfg.max_steps`` steps will see, in order (a fresh copy of its stream)."""
    stream = PromptStream.from_config(cfg, examples)
    seen: dict[str, Example] = {}
    for _ in range(cfg.max_steps):
        for ex in stream.next_batch():
            seen.setdefault(_example_key(ex), ex)
    return list(seen.values())


def _example_key(ex: Example) -> str:
    return hashlib.sha256(json.dumps([ex.id, ex.question, ex.reference]).encode()).hexdigest()[:20]


def sft_cache_path(cfg: RunConfig, teacher: Teacher) -> Path:
    from omniopd.engine.models import cache_dir
    from omniopd.engine.prompts import ANSWER_INSTRUCTION

    root = Path(cfg.sft.cache_dir) if cfg.sft.cache_dir else cache_dir() / "sft-solutions"
    spec = {
        # privileged: an API teacher's flag (an in-process teacher's is its type)
        "teacher": teacher.name,
        "type": cfg.teacher.type,
        "model": cfg.teacher.model,
        "privileged": getattr(cfg.teacher, "privileged", False),
        "temperature": cfg.sft.temperature,
        "top_p": cfg.teacher.top_p,
        "max_new_tokens": cfg.sft.max_new_tokens,
        "seed": cfg.seed,
        "instruction": ANSWER_INSTRUCTION,
    }
    if cfg.sft.solutions_per_prompt > 1:  # one request of n samples: not the same draws as n = 1
        spec["n"] = cfg.sft.solutions_per_prompt
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


def _target_keys(ex: Example, k: int) -> list[str]:
    """The cache keys of an example's ``k`` solutions (one solution: the example's own key)."""
    key = _example_key(ex)
    return [key] if k == 1 else [f"{key}#{j}" for j in range(k)]


def _teacher_length(teacher: Teacher, text: str) -> int:
    """One of several completions' length in the teacher's tokens (0, read as finished, when it has no tokenizer)."""
    return len(teacher.tokenizer.encode(text, add_special_tokens=False)) if teacher.tokenizer is not None else 0


def teacher_solutions(cfg: RunConfig, teacher: Teacher, examples: list[Example]) -> dict[str, SFTTarget]:
    """``sft.solutions_per_prompt`` teacher-written solutions per example (keyed by :func:`_target_keys`), read
    from the cache or generated (and appended) once."""
    path = sft_cache_path(cfg, teacher)
    cached = _read_cache(path)
    k = cfg.sft.solutions_per_prompt
    missing = [ex for ex in examples if any(key not in cached for key in _target_keys(ex, k))]
    if missing:
        tqdm.write(f"omniopd: sft: the teacher writes {len(missing) * k} solutions (once; cached in {path})")
        spec = SamplingSpec(
            n=k,
            max_new_tokens=cfg.sft.max_new_tokens,
            temperature=cfg.sft.temperature,
            top_p=cfg.teacher.top_p,
            seed=cfg.seed,
        )
        requests = [
            ContinuationRequest(
                question=ex.question, prefix="", reference=ex.reference, trajectory=i, instruction=ex.instruction
            )
            for i, ex in enumerate(missing)
        ]
        results = teacher.continue_prefixes(requests, spec)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as fh:
            for ex, res in zip(missing, results, strict=True):
                if not res.ok or len(res.texts) != k:
                    raise TeacherError(
                        f"sft: the teacher failed to write {k} solution(s) for {ex.id}: {res.error or 'no text'}"
                    )
                per_text = (res.prompt_tokens + res.completion_tokens) / k  # a request's tokens, shared
                lengths = [res.completion_tokens] if k == 1 else [_teacher_length(teacher, t) for t in res.texts]
                for key, text, length in zip(_target_keys(ex, k), res.texts, lengths, strict=True):
                    # a completion shorter than the limit ended on EOS (the local teachers stop there)
                    target = SFTTarget(text, length < spec.max_new_tokens, round(per_text))
                    cached[key] = target
                    fh.write(
                        json.dumps(
                            {
                                "key": key,
                                "id": ex.id,
                                "text": target.text,
                                "finished": target.finished,
                                "teacher_tokens": target.teacher_tokens,
                            }
                        )
                        + "\n"
                    )
    return {key: cached[key] for ex in examples for key in _target_keys(ex, k)}


def prepare(state: TrainState) -> None:
    """Every target of the run, once: the references, or the teacher's solutions (cached)."""
    cfg = state.cfg
    examples = visited_examples(state.stream.examples, cfg)
    if cfg.sft.source == "reference":
        no_ref = [ex.id for ex in examples if not ex.reference]
        if no_ref:
            raise DataError(
                f"sft.source=reference needs reference solutions; {cfg.data.train} has none for {no_ref[0]} ({len(no_ref)} prompts)"
            )
        # every example has a reference (checked above)
        targets = {_example_key(ex): SFTTarget(clean_reference(ex.reference), True) for ex in examples if ex.reference}
    else:
        targets = teacher_solutions(cfg, state.teacher, examples)
    state.extras["sft_targets"] = targets
    with (state.out_dir / "sft_solutions.jsonl").open("w", encoding="utf-8") as fh:
        for ex in examples:
            for key in _target_keys(ex, cfg.sft.solutions_per_prompt):
                t = targets[key]
                row = {"id": ex.id, "source": cfg.sft.source, "text": t.text, "finished": t.finished}
                fh.write(json.dumps(row) + "\n")


def sample(state: TrainState, examples: list[Example]) -> Rollouts:
    """The target solutions of this step's prompts as a packed batch: [student prompt | target tokens]."""
    tok, cap, k = state.tokenizer, state.cfg.sft.max_new_tokens, state.cfg.sft.solutions_per_prompt
    targets: dict[str, SFTTarget] = state.extras["sft_targets"]
    index = [i for i in range(len(examples)) for _ in range(k)]  # every solution of each prompt
    prompts = chat_prompts(tok, [student_messages(examples[i].question, examples[i].instruction) for i in index])
    responses, finished = [], []
    for ex in examples:
        for key in _target_keys(ex, k):
            t = targets[key]
            ids = tok.encode(t.text, add_special_tokens=False)
            done = t.finished and len(ids) < cap  # cut at the cap (in student tokens): no EOS after a cut
            responses.append(ids[:cap] + ([tok.eos_token_id] if done else []))
            finished.append(done)
    batch = pack(tok, prompts, responses, tok.pad_token_id)
    return Rollouts(batch=batch, example_index=index, lengths=[len(r) for r in responses], finished=finished)


def audit(state: TrainState, rollouts: Rollouts, examples: list[Example]) -> StepSignal:
    targets: dict[str, SFTTarget] = state.extras["sft_targets"]
    used = [targets[key] for ex in examples for key in _target_keys(ex, state.cfg.sft.solutions_per_prompt)]
    from_teacher = state.cfg.sft.source == "teacher"
    n = len(rollouts.lengths)
    return StepSignal(
        metrics={
            "sft/target_mean_length": sum(rollouts.lengths) / max(n, 1),
            "sft/target_truncated_frac": 1.0 - sum(rollouts.finished) / max(n, 1),
            "teacher/tokens": float(sum(t.teacher_tokens for t in used)),
            "teacher/requests": float(len(used)) if from_teacher else 0.0,
        }
    )


def loss(cfg: RunConfig) -> LossSpec:
    return "sft", {}


def loss_inputs(state: TrainState, idx: list[int], sub: SequenceBatch, signal: StepSignal) -> LossInputs:
    """The target tokens, each of weight 1 (the loss divides by the number of sequences in the step)."""
    stats = response_token_stats(state.model, sub, slice_size=state.cfg.loss.slice_size)
    return LossInputs(logprobs=stats.logprobs, response_mask=sub.response_mask, ce_mask=sub.response_mask)


def teacher_role(cfg: RunConfig) -> TeacherRole | None:
    return "solutions" if cfg.sft.source == "teacher" else None


def labels(cfg: RunConfig) -> list[str]:
    k = cfg.sft.solutions_per_prompt
    many = f", {k} per prompt at temperature {cfg.sft.temperature:g}" if k > 1 else ""
    return [f"sft on {cfg.sft.source} solutions{many}"]


SFT = Method(
    name="sft",
    sample=sample,
    audit=audit,
    loss=loss,
    loss_inputs=loss_inputs,
    teacher_role=teacher_role,
    on_policy=False,
    prepare=prepare,
    labels=labels,
)

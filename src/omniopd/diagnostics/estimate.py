"""``omniopd estimate RECIPE.yaml [key=value ...]``: what an API teacher will bill, before paying for it.

The requests come from real rollouts: a few batches of the recipe's prompts are sampled from its student and
audited exactly as training would audit them, with a teacher that only records what it is asked (the
anchors, the prefixes, N, C). Each recorded batch is then turned into the payloads the recipe's API backend
would send (its own ``build_payload``, its prompt-cache shaping, its samples per request) and replayed in the
order its dispatch sends them through a model of the provider's prompt cache
(:mod:`omniopd.teachers.prompt_cache`; tokens at 4 characters each). Requests sent together do not see each
other's cache writes: ``warm_first`` sends a trajectory's shortest prefix (its first sample, then the others),
then the first samples of the other chunks together, then the rest; ``sequential`` one chunk after another;
``parallel`` every chunk's first sample together, then the rest; the trajectories of a batch all together.
A concurrency limit that sends fewer at once (the adaptive limit's slow start) lets more requests read what
an earlier one wrote, so the estimate is an upper bound on cache writes. Every sample is assumed to use its
whole output allowance (``ceil(C * max_tokens_factor)`` tokens). Dollars come from the teacher's prices (its options,
else the table of known models, :mod:`omniopd.teachers.prices`).

Two rows are printed: without caching (every prompt token at the input price: ``teacher.prompt_cache=false``
on Anthropic; a provider that caches on its own, OpenAI or Gemini, treated as if it did not) and with the
recipe's prompt caching. Per step scales the measured prompts to ``optim.prompts_per_step``; per epoch to the
training set's size. Adaptive N (``audit.adaptive_n``) is estimated at its ceiling, N samples for every chunk.

``--paper`` replaces the rollouts by the paper's setting, which no CPU can sample: 17,000 DAPO-Math prompts,
8 samples each, M=10 chunks of C=50 tokens, N=10 teacher samples. Its prefixes are synthetic: a task of 200
tokens and an answer of 1,660 tokens with the M anchors evenly spread, so a chunk's prompt averages 1,030
tokens and the 1.36M chunk prompts of an epoch hold the issue's 1.4B prompt tokens (each counted once).
"""

from __future__ import annotations

import math
import random
import string
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Any

from omniopd.config import RunConfig
from omniopd.config.teachers import API_TEACHER_TYPES, APITeacherConfig
from omniopd.errors import ConfigError
from omniopd.teachers.base import ContinuationRequest, ContinuationResult, SamplingSpec, Teacher
from omniopd.teachers.prices import PROVIDER_OF_BACKEND, min_cache_tokens, resolve_prices
from omniopd.teachers.prompt_cache import (
    OPENAI_INCREMENT,
    BreakpointCache,
    CacheUsage,
    PrefixCache,
    approx_tokens,
    chat_prompt_text,
    gemini_prompt_text,
    message_blocks,
)

#: the paper's setting (``--paper``); task and answer lengths are the synthetic prefixes' (see the docstring)
PAPER = {
    "dataset_prompts": 17_000,
    "samples_per_prompt": 8,
    "chunk_tokens": 50,
    "num_chunks": 10,
    "teacher_samples": 10,
    "task_tokens": 200,
    "response_tokens": 1_660,
}
PAPER_TEACHER = {"type": "anthropic", "model": "claude-haiku-4-5"}  # when the recipe's teacher is not an API


class RecordingTeacher(Teacher):
    """Records every batch it is asked for and answers each request with ``n`` empty continuations."""

    name = "estimate:recording"

    def __init__(self) -> None:
        self.calls: list[tuple[list[ContinuationRequest], SamplingSpec]] = []

    def continue_prefixes(self, requests: list[ContinuationRequest], spec: SamplingSpec) -> list[ContinuationResult]:
        self.calls.append((list(requests), spec))
        return [ContinuationResult(texts=[""] * spec.n) for _ in requests]


@dataclass
class Bill:
    """What a sequence of requests bills: requests and tokens (prompt in total, read, written; generated)."""

    requests: float = 0.0
    prompt_tokens: float = 0.0
    cached_tokens: float = 0.0
    cache_write_tokens: float = 0.0
    completion_tokens: float = 0.0

    def add(self, usage: CacheUsage, completion_tokens: int) -> None:
        self.requests += 1
        self.prompt_tokens += usage.prompt_tokens
        self.cached_tokens += usage.cached_tokens
        self.cache_write_tokens += usage.cache_write_tokens
        self.completion_tokens += completion_tokens

    def scaled(self, factor: float) -> Bill:
        return Bill(**{k: v * factor for k, v in asdict(self).items()})


# --------------------------------------------------------------------------------------------------
# replaying recorded batches through a provider's cache
# --------------------------------------------------------------------------------------------------


class _NoCache:
    """A provider that caches nothing: every prompt token billed in full."""

    def lookup(self, model: str, prompt: Any) -> tuple[CacheUsage, list]:
        total = sum(approx_tokens(b.text) for b in prompt) if isinstance(prompt, list) else approx_tokens(prompt)
        return CacheUsage(total), []

    def commit(self, pending: list) -> None:
        pass


def _prompt(backend: str, payload: dict[str, Any]) -> Any:
    """A payload's prompt in the form its provider's cache model reads."""
    if backend == "anthropic-messages":
        return message_blocks(payload)
    if backend == "openai-completions":
        return payload["prompt"]
    if backend == "openai-chat":
        return chat_prompt_text(payload["messages"])
    return gemini_prompt_text(payload["contents"])


def _generated(backend: str, payload: dict[str, Any]) -> int:
    """Output tokens a payload can bill: its allowance times the samples it asks for."""
    if backend == "anthropic-messages":
        return int(payload["max_tokens"])
    if backend == "gemini":
        return int(payload["config"]["max_output_tokens"]) * int(payload["config"]["candidate_count"])
    allowance = payload.get("max_tokens") or payload.get("max_completion_tokens") or 0
    return int(allowance) * int(payload.get("n") or 1)


def dispatch_waves(teacher, requests: list[ContinuationRequest], spec: SamplingSpec) -> list[list[dict[str, Any]]]:
    """The payloads of one batch in the groups ``teacher.options.dispatch`` sends together (see the module
    docstring): a trajectory's prefixes ascending, each chunk's first request before the rest of its samples."""
    n = spec.n
    per = min(n, teacher.max_n_per_request or n)
    groups: dict[int, list[int]] = defaultdict(list)
    for i, r in enumerate(requests):
        groups[r.trajectory].append(i)
    waves: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for idxs in groups.values():
        for rank, i in enumerate(sorted(idxs, key=lambda i: (len(requests[i].prefix), i))):
            first, *rest = [teacher.build_payload(requests[i], spec, min(per, n - s), s) for s in range(0, n, per)]
            if teacher.options.dispatch == "sequential":
                w = 2 * rank
            elif teacher.options.dispatch == "parallel":
                w = 0
            else:  # warm_first: the shortest prefix alone, then the others together
                w = 0 if rank == 0 else 2
            waves[w].append(first)
            waves[w + 1].extend(rest)
    return [waves[w] for w in sorted(waves) if waves[w]]


def replay(teacher, calls: list[tuple[list[ContinuationRequest], SamplingSpec]], cached: bool) -> Bill:
    """Bill ``calls`` (recorded batches) as ``teacher`` would send them, through its provider's cache model
    (``cached``) or none."""
    backend = teacher.backend
    provider = PROVIDER_OF_BACKEND[backend]
    minimum = teacher.options.prompt_cache_min_tokens or min_cache_tokens(teacher.model, provider)
    if not cached:
        cache: Any = _NoCache()
    elif provider == "anthropic":
        cache = BreakpointCache(lambda _: minimum)
    else:
        cache = PrefixCache(lambda _: minimum, increment=OPENAI_INCREMENT if provider == "openai" else 1)
    bill = Bill()
    for requests, spec in calls:
        teacher.plan_requests(requests)
        for wave in dispatch_waves(teacher, requests, spec):
            looked = [(cache.lookup(teacher.model, _prompt(backend, p)), p) for p in wave]
            for (usage, pending), payload in looked:
                cache.commit(pending)
                bill.add(usage, _generated(backend, payload))
    return bill


# --------------------------------------------------------------------------------------------------
# where the requests come from
# --------------------------------------------------------------------------------------------------


def rollout_calls(cfg: RunConfig, prompts: int) -> tuple[list, int]:
    """Record the audit's teacher batches on real rollouts of ``prompts`` prompts of the recipe (whole steps of
    ``optim.prompts_per_step``, at least one); returns (calls, prompts sampled)."""
    import torch

    from omniopd.data import PromptStream
    from omniopd.engine.models import load_model
    from omniopd.engine.prompts import student_messages
    from omniopd.engine.rollout import chat_prompts, sample_rollouts_as
    from omniopd.methods.omniopd.audit import run_audit

    torch.manual_seed(cfg.seed)
    model, tok = load_model(cfg.student.name, cfg.student.dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    stream = PromptStream.from_config(cfg)
    audit_cfg = cfg.audit.model_copy(update={"adaptive_n": False})  # the ceiling: N for every chunk
    recorder, sampled, r = RecordingTeacher(), 0, cfg.rollout
    for step in range(max(1, math.ceil(prompts / cfg.optim.prompts_per_step))):
        examples = stream.next_batch()
        prompts_text = chat_prompts(tok, [student_messages(e.question, e.instruction) for e in examples])
        ro = sample_rollouts_as(model, tok, prompts_text, r)
        stats = (ro.entropy, ro.logprobs) if ro.entropy is not None and ro.logprobs is not None else None
        run_audit(
            step=step + 1,
            model=model,
            tokenizer=tok,
            batch=ro.batch,
            lengths=ro.lengths,
            examples=[examples[i] for i in ro.example_index],
            teacher=recorder,
            audit_cfg=audit_cfg,
            teacher_cfg=cfg.teacher,
            seed=cfg.seed,
            micro_batch_size=cfg.optim.micro_batch_size,
            slice_size=cfg.loss.slice_size,
            record_trajectories=0,
            token_stats=stats,
        )
        sampled += len(examples)
    return recorder.calls, sampled


def paper_calls(
    samples: int, M: int, N: int, C: int, task_tokens: int, response_tokens: int, max_new_tokens: int, seed: int = 0
) -> list:
    """One prompt's audit batch in the paper's shapes: ``samples`` trajectories of a synthetic answer of
    ``response_tokens`` (4 letters each, distinct per trajectory) with ``M`` anchors evenly spread."""
    rng = random.Random(seed)
    letters = lambda k: "".join(rng.choices(string.ascii_lowercase, k=k))  # noqa: E731
    question = letters(4 * task_tokens)
    requests = []
    for b in range(samples):
        answer = letters(4 * response_tokens)
        for j in range(M):
            start = (2 * j + 1) * response_tokens // (2 * M)  # anchor j at the middle of the j-th M-th
            requests.append(
                ContinuationRequest(question=question, prefix=answer[: 4 * start], trajectory=b, instruction="")
            )
    return [(requests, SamplingSpec(n=N, max_new_tokens=max_new_tokens or C, seed=seed))]


# --------------------------------------------------------------------------------------------------
# the estimate
# --------------------------------------------------------------------------------------------------


def _api_teacher(cfg: RunConfig, prompt_cache: bool):
    """The recipe's API backend, built without credentials (it sends nothing)."""
    from omniopd.teachers import build_teacher

    assert isinstance(cfg.teacher, APITeacherConfig)  # called for API teachers only
    url = cfg.teacher.base_url or "http://estimate.invalid"  # a custom URL needs no key; nothing is contacted
    teacher_cfg = cfg.teacher.model_copy(update={"base_url": url, "cache": False, "prompt_cache": prompt_cache})
    return build_teacher(cfg.model_copy(update={"teacher": teacher_cfg}))


def estimate(cfg: RunConfig, *, prompts: int | None = None, paper: bool = False) -> dict[str, Any]:
    """The report ``omniopd estimate`` prints (:func:`format_estimate`) and writes as JSON."""
    notes = []
    if paper:
        from omniopd.config import build_config

        data = cfg.model_dump(mode="json")
        if cfg.teacher.type not in API_TEACHER_TYPES:
            data["teacher"] = dict(PAPER_TEACHER)
            notes.append(
                f"the recipe's teacher is {cfg.teacher.type}: priced as {PAPER_TEACHER['type']} "
                f"{PAPER_TEACHER['model']}"
            )
        data["audit"].update(
            chunk_tokens=PAPER["chunk_tokens"], num_chunks=PAPER["num_chunks"], teacher_samples=PAPER["teacher_samples"]
        )
        data["rollout"]["samples_per_prompt"] = PAPER["samples_per_prompt"]
        cfg = build_config(data)
    if cfg.teacher.type not in API_TEACHER_TYPES:
        raise ConfigError(
            f"omniopd estimate prices an API teacher, and teacher.type={cfg.teacher.type} runs in "
            "process; add e.g. teacher.type=anthropic teacher.model=claude-haiku-4-5"
        )
    a = cfg.audit
    if a.adaptive_n:
        notes.append("audit.adaptive_n: estimated at its ceiling (N samples for every chunk)")
    if paper:
        calls = paper_calls(
            PAPER["samples_per_prompt"],
            a.num_chunks,
            a.teacher_samples,
            a.chunk_tokens,
            PAPER["task_tokens"],
            PAPER["response_tokens"],
            cfg.teacher.max_new_tokens or a.chunk_tokens,
            seed=cfg.seed,
        )
        sampled, dataset = 1, PAPER["dataset_prompts"]
        source = (
            f"synthetic prefixes: task {PAPER['task_tokens']} tokens, answer {PAPER['response_tokens']} tokens, "
            f"{a.num_chunks} anchors evenly spread"
        )
    else:
        from omniopd.data import load_train_examples

        dataset = len(load_train_examples(cfg.data.train, allow_eval_overlap=cfg.data.allow_eval_overlap))
        calls, sampled = rollout_calls(cfg, prompts or cfg.optim.prompts_per_step)
        source = f"real rollouts of {cfg.student.name}: {sampled} prompts x {cfg.rollout.samples_per_prompt} samples"
    chunks = sum(len(reqs) for reqs, _ in calls)
    teachers = {on: _api_teacher(cfg, prompt_cache=on) for on in (False, True)}
    try:
        bills = {on: replay(teachers[on], calls, cached=on) for on in (False, True)}
        t = teachers[True]
        provider = PROVIDER_OF_BACKEND[t.backend]
        prices = resolve_prices(
            t.model,
            provider,
            input=t.options.price_input_per_mtok,
            output=t.options.price_output_per_mtok,
            cached_input=t.options.price_cached_input_per_mtok,
            cache_write=t.options.price_cache_write_per_mtok,
        )
        minimum = t.options.prompt_cache_min_tokens or min_cache_tokens(t.model, provider)
        name, dispatch, per_request = t.name, t.options.dispatch, t.max_n_per_request
    finally:
        for teacher in teachers.values():
            teacher.close()
    per_step = cfg.optim.prompts_per_step / sampled
    per_epoch = dataset / sampled
    chunk_prompt_tokens = sum(approx_tokens(t_) for reqs, _ in calls for t_ in _chunk_prompts(teachers[False], reqs))

    def row(bill: Bill) -> dict[str, Any]:
        out = {}
        for label, factor in (("per_step", per_step), ("per_epoch", per_epoch)):
            b = bill.scaled(factor)
            cost = prices.cost_usd(b.prompt_tokens, b.completion_tokens, b.cached_tokens, b.cache_write_tokens)
            out[label] = {**asdict(b), "cost_usd": cost}
        return out

    rows = {"no_caching": row(bills[False]), "prompt_cache": row(bills[True])}
    off, on = rows["no_caching"]["per_epoch"]["cost_usd"], rows["prompt_cache"]["per_epoch"]["cost_usd"]
    return {
        "teacher": name,
        "provider": provider,
        "dispatch": dispatch,
        "samples_per_request": per_request or a.teacher_samples,
        "prices_usd_per_mtok": asdict(prices),
        "min_cache_tokens": minimum,
        "setting": {
            "paper": paper,
            "source": source,
            "dataset_prompts": dataset,
            "prompts_per_step": cfg.optim.prompts_per_step,
            "steps_per_epoch": math.ceil(dataset / cfg.optim.prompts_per_step),
            "samples_per_prompt": cfg.rollout.samples_per_prompt,
            "chunk_tokens": a.chunk_tokens,
            "num_chunks": a.num_chunks,
            "teacher_samples": a.teacher_samples,
        },
        "measured": {
            "prompts": sampled,
            "chunks": chunks,
            "mean_chunk_prompt_tokens": chunk_prompt_tokens / chunks if chunks else 0.0,
        },
        # every chunk's prompt counted once (as where one request carries all N samples), per epoch
        "chunk_prompt_tokens_per_epoch": chunk_prompt_tokens * per_epoch,
        "once_per_chunk_cost_usd": prices.cost_usd(
            chunk_prompt_tokens * per_epoch, rows["no_caching"]["per_epoch"]["completion_tokens"]
        ),
        "rows": rows,
        "saving_frac": 1.0 - on / off if off > 0 else 0.0,
        "notes": notes,
    }


def _chunk_prompts(teacher, requests: list[ContinuationRequest]) -> list[str]:
    """The text of each chunk's prompt (unshaped), for the once-per-chunk count."""
    spec = SamplingSpec(n=1, max_new_tokens=1)
    out = []
    for r in requests:
        prompt = _prompt(teacher.backend, teacher.build_payload(r, spec, 1, 0))
        out.append("".join(b.text for b in prompt) if isinstance(prompt, list) else prompt)
    return out


def _num(x: float) -> str:
    if abs(x) >= 1e9:
        return f"{x / 1e9:,.2f}B"
    if abs(x) >= 1e6:
        return f"{x / 1e6:,.2f}M"
    if abs(x) >= 1e4:
        return f"{x / 1e3:,.1f}K"
    return f"{x:,.0f}" if abs(x) >= 100 or x == int(x) else f"{x:,.1f}"


def _usd(x: float) -> str:
    return f"${x:,.2f}" if x >= 1 else f"${x:.4f}"


def format_estimate(report: dict[str, Any]) -> str:
    s, p, m = report["setting"], report["prices_usd_per_mtok"], report["measured"]
    lines = [
        f"omniopd estimate: {report['teacher']} ({report['provider']}, dispatch={report['dispatch']}, "
        f"{report['samples_per_request']} sample(s) per request)",
        f"  {s['dataset_prompts']:,} prompts x {s['samples_per_prompt']} samples, C={s['chunk_tokens']} "
        f"M={s['num_chunks']} N={s['teacher_samples']}; {s['prompts_per_step']} prompts per step, "
        f"{s['steps_per_epoch']:,} steps per epoch",
        f"  from {s['source']}; {m['chunks']} chunks, mean chunk prompt {m['mean_chunk_prompt_tokens']:,.0f} tokens "
        f"(4 characters each); {_num(report['chunk_prompt_tokens_per_epoch'])} prompt tokens per epoch counted once "
        "per chunk",
        f"  prices $/MTok: input {p['input']:g}, cached {p['cached_input']:g}, cache write {p['cache_write']:g}, "
        f"output {p['output']:g}; prefixes under {report['min_cache_tokens']:,} tokens are not cached",
        "",
        f"  {'':10}{'':14}{'requests':>11}{'prompt tok':>12}{'cached':>11}{'written':>11}{'generated':>11}{'USD':>12}",
    ]
    for scope in ("per_step", "per_epoch"):
        for key, label in (("no_caching", "no caching"), ("prompt_cache", "prompt cache")):
            r = report["rows"][key][scope]
            lines.append(
                f"  {scope.replace('_', ' ') if key == 'no_caching' else '':10}{label:14}{_num(r['requests']):>11}"
                f"{_num(r['prompt_tokens']):>12}{_num(r['cached_tokens']):>11}{_num(r['cache_write_tokens']):>11}"
                f"{_num(r['completion_tokens']):>11}{_usd(r['cost_usd']):>12}"
            )
    lines.append(
        f"  prompt caching saves {100 * report['saving_frac']:.1f}% of the dollars; with every chunk's prompt "
        f"billed once (one request for all N samples) and no caching an epoch would cost "
        f"{_usd(report['once_per_chunk_cost_usd'])}"
    )
    lines += [f"  note: {n}" for n in report["notes"]]
    return "\n".join(lines)


__all__ = [
    "PAPER",
    "Bill",
    "RecordingTeacher",
    "dispatch_waves",
    "estimate",
    "format_estimate",
    "paper_calls",
    "replay",
    "rollout_calls",
]

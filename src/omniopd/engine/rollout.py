"""Student rollouts with Hugging Face ``generate`` (ALGORITHM.md step 1).

Sampling is from the distribution the loss assumes: a fresh ``GenerationConfig`` with top_k=0 and the
configured temperature/top_p, so the checkpoint's generation defaults (top_k=50 in transformers, or a
temperature shipped with the model) never apply silently. Prompts are left-padded; responses are
right-padded, kept as token ids with a mask that covers the tokens up to and including the first EOS.
A response that hits ``max_new_tokens`` without EOS is counted as truncated.

While sampling, :class:`omniopd.engine.decoding.RawTokenStats` records the entropy H_t and log p(y_t) of the
unmodified distribution (full vocabulary, fp32, before temperature/top_p) at every position, so the audit
needs no second forward (``Rollouts.entropy``/``Rollouts.logprobs``). If the checkpoint's generation config
would add a logits processor of its own ahead of the sampling warpers, the rollout records nothing (the
statistics would not be of the unmodified distribution) and the audit computes them with a forward, as
before. ``compile`` selects plain or compiled decoding (``rollout.compile``, see :mod:`omniopd.engine.decoding`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from transformers import GenerationConfig

from omniopd.engine import decoding
from omniopd.engine.alignment import SequenceBatch
from omniopd.engine.models import eos_token_ids

log = logging.getLogger(__name__)


@dataclass
class Rollouts:
    batch: SequenceBatch
    example_index: list[int]  # which prompt each trajectory answers (B,)
    lengths: list[int]  # real response length in tokens, EOS included (B,)
    finished: list[bool]  # ended with EOS (B,)
    # H_t and log p(y_t) of the unmodified distribution recorded while sampling, (B, T) fp32 aligned with
    # batch.response_ids and zero past each response; None where the rollout could not record them
    entropy: torch.Tensor | None = None
    logprobs: torch.Tensor | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # time/compile_s: seconds this rollout spent compiling

    @property
    def truncated_frac(self) -> float:
        return 1.0 - sum(self.finished) / max(len(self.finished), 1)


def generation_config(tokenizer, eos: list[int], max_new_tokens: int, temperature: float, top_p: float, n: int = 1):
    greedy = temperature == 0
    return GenerationConfig(
        do_sample=not greedy,
        temperature=None if greedy else temperature,
        top_p=None if greedy else top_p,
        top_k=None if greedy else 0,  # 0 disables top-k: sample from the full distribution
        max_new_tokens=max_new_tokens,
        num_return_sequences=n,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos,
    )


def chat_prompts(tokenizer, messages_list: list[list[dict[str, str]]]) -> list[str]:
    return [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in messages_list]


@torch.no_grad()
def generate_texts(
    model,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float = 1.0,
    n: int = 1,
    batch_size: int = 16,
    progress=None,
    compile: str = "off",
) -> tuple[list[list[int]], list[bool]]:
    """Sample ``n`` responses per prompt. Returns response token ids (EOS kept, padding removed) and EOS flags,
    ordered prompt-major (all samples of prompt 0, then prompt 1, ...)."""
    responses, finished, _ = _generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        n=n,
        batch_size=batch_size,
        progress=progress,
        compile=compile,
        record_stats=False,
    )
    return responses, finished


_warned: set[tuple[str, ...]] = set()


def _generate(
    model,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    n: int,
    batch_size: int,
    progress,
    compile: str,
    record_stats: bool,
) -> tuple[list[list[int]], list[bool], list[tuple[torch.Tensor, torch.Tensor]] | None]:
    """:func:`generate_texts`, and with ``record_stats`` each response's (entropy, log p) over its tokens
    (None when the checkpoint's own logits processors would come first, see the module docstring)."""
    eos = eos_token_ids(model, tokenizer)
    gen = generation_config(tokenizer, eos, max_new_tokens, temperature, top_p, n)
    if record_stats and (inherited := tuple(decoding.inherited_processors(model))):
        if inherited not in _warned:
            _warned.add(inherited)
            log.warning(
                "the student's generation config sets %s: entropy and log-probs are computed by a second "
                "forward, not while sampling",
                ", ".join(inherited),
            )
        record_stats = False
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    per_call = max(1, batch_size // n)
    responses: list[list[int]] = []
    finished: list[bool] = []
    stats: list[tuple[torch.Tensor, torch.Tensor]] = []
    for i in range(0, len(prompts), per_call):
        enc = tokenizer(prompts[i : i + per_call], return_tensors="pt", padding=True, add_special_tokens=False).to(
            device
        )
        if record_stats:
            call_gen, procs, recorder = decoding.raw_stats_sampling(gen)
        else:
            call_gen, procs, recorder = gen, None, None
        out = decoding.generate(
            model, enc["input_ids"], enc["attention_mask"], call_gen, compile=compile, logits_processor=procs
        )
        new = out[:, enc["input_ids"].shape[1] :]
        recorded = recorder.result(new) if recorder is not None else None  # (entropy, log p), each (B, T)
        for r, row in enumerate(new.tolist()):
            cut = next((k for k, t in enumerate(row) if t in eos), None)
            responses.append(row if cut is None else row[: cut + 1])
            finished.append(cut is not None)
            if recorded is not None:
                ent, logp = recorded
                L = len(responses[-1])
                stats.append((ent[r, :L], logp[r, :L]))
        if progress is not None:
            progress.update(len(prompts[i : i + per_call]))
    return responses, finished, stats if record_stats else None


def pack(tokenizer, prompts: list[str], responses: list[list[int]], pad_id: int) -> SequenceBatch:
    """[left-padded prompt | right-padded response] tensors for a training/scoring forward."""
    prompt_ids = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    P = max(len(p) for p in prompt_ids)
    T = max(1, max(len(r) for r in responses))
    B = len(responses)
    ids = torch.full((B, P + T), pad_id, dtype=torch.long)
    att = torch.zeros(B, P + T, dtype=torch.long)
    rmask = torch.zeros(B, T, dtype=torch.bool)
    for b, (p, r) in enumerate(zip(prompt_ids, responses, strict=True)):
        ids[b, P - len(p) : P] = torch.tensor(p)
        att[b, P - len(p) : P] = 1
        if r:
            ids[b, P : P + len(r)] = torch.tensor(r)
            att[b, P : P + len(r)] = 1
            rmask[b, : len(r)] = True
    return SequenceBatch(input_ids=ids, attention_mask=att, prompt_len=P, response_ids=ids[:, P:], response_mask=rmask)


def sample_rollouts(
    model,
    tokenizer,
    prompts: list[str],
    *,
    samples_per_prompt: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    batch_size: int,
    compile: str = "off",
) -> Rollouts:
    compiled_before = decoding.compile_seconds(model)
    responses, finished, stats = _generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        n=samples_per_prompt,
        batch_size=batch_size,
        progress=None,
        compile=compile,
        record_stats=True,
    )
    example_index = [i for i in range(len(prompts)) for _ in range(samples_per_prompt)]
    expanded = [prompts[i] for i in example_index]
    batch = pack(tokenizer, expanded, responses, tokenizer.pad_token_id)
    entropy = logprobs = None
    if stats is not None:
        entropy = torch.zeros(batch.response_ids.shape)
        logprobs = torch.zeros(batch.response_ids.shape)
        for b, (ent, logp) in enumerate(stats):
            entropy[b, : len(ent)] = ent
            logprobs[b, : len(logp)] = logp
    return Rollouts(
        batch=batch,
        example_index=example_index,
        lengths=[len(r) for r in responses],
        finished=finished,
        entropy=entropy,
        logprobs=logprobs,
        metrics={"time/compile_s": decoding.compile_seconds(model) - compiled_before},
    )


def sample_rollouts_as(model, tokenizer, prompts: list[str], rollout) -> Rollouts:
    """:func:`sample_rollouts` with the sampling a run's ``rollout`` config section sets (compile included)."""
    r = rollout
    return sample_rollouts(
        model,
        tokenizer,
        prompts,
        samples_per_prompt=r.samples_per_prompt,
        max_new_tokens=r.max_new_tokens,
        temperature=r.temperature,
        top_p=r.top_p,
        batch_size=r.batch_size,
        compile=r.compile,
    )

"""In-process Hugging Face teachers: ``local`` and ``privileged``.

``local``: any causal LM (any tokenizer) continues ``chat_template(question) + student_prefix``.
``privileged``: the same, but the question carries the dataset's reference solution (self-distillation
with privileged information). With SmolLM2-135M-Instruct this is a real, strong teacher: greedy on 24
GSM8K dev problems the model alone solved 0 and the same model with the reference solved 20.

The N continuations of a request share one prefill: the prompt's key/value cache is computed once,
repeated N times, and ``generate`` decodes the N samples from it (``reuse_prefix=True``, the default;
on CPU the prefill of a few-hundred-token prompt costs far more than decoding C tokens, so this cuts
teacher time by close to N). ``reuse_prefix=False`` is the plain path (``num_return_sequences=N``,
N prefills). Sampling has top_k disabled (top_k=0) so temperature and top_p are the only shaping.

``share_prefixes=True`` (with ``reuse_prefix``; off by default) also shares the prefill *across* the
requests of one generate call: the chunk prefixes of a trajectory are nested, and the samples of one
prompt share its question (and reference), so a request's prompt tokens are mostly a prefix of a longer
request's. Rows are prefilled longest first, one at a time; a row whose tokens (all but the last) are a
prefix of a row already computed takes that row's key/value slice (causal attention: the keys and values
at position t depend only on tokens <= t), a row that shares only part continues from the shared slice,
and the slices are assembled into the same left-padded cache the batched prefill would give. The
continuations are the same as the plain path's for a fixed seed (the batch, the rows and the random
stream are unchanged; only where the cache's numbers come from differs, by float rounding). Used only
when every cache layer is a plain full-attention layer (no sliding window, no recurrent state);
otherwise the batched prefill runs. ``prefill_stats`` counts computed and reused prompt positions.
Each call runs under a forked RNG seeded from the spec, so teacher draws do not perturb the student's
sampling stream and a rerun with the same seed reproduces them.

``compile`` (``auto``/``on``/``off``, the run's ``rollout.compile``) decodes through transformers' static
cache with a compiled forward (:mod:`omniopd.engine.decoding`). It applies to both prefill modes: with
``reuse_prefix`` the prompt is prefilled as above (batched or shared, eagerly, into a dynamic cache) and its
keys and values are then copied, each row N times, into a static cache that the compiled decode steps
continue; without it ``generate`` builds the static cache itself. A model whose layers are not all plain full
attention keeps the dynamic cache (and the plain decode steps), and a failed compile falls back to the plain
path for good, from the same random state.
"""

from __future__ import annotations

from typing import cast

import torch
from transformers import DynamicCache, GenerationConfig, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicLayer

from omniopd.engine import decoding
from omniopd.engine.alignment import position_ids
from omniopd.engine.models import eos_token_ids, load_model
from omniopd.evaluation.stats import mix_seed
from omniopd.teachers.base import ContinuationRequest, ContinuationResult, SamplingSpec, Teacher
from omniopd.teachers.protocols import in_process_prompt


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class LocalTeacher(Teacher):
    tokenizer: PreTrainedTokenizerBase

    def __init__(
        self,
        model,
        tokenizer,
        name: str,
        privileged: bool,
        batch_size: int = 32,
        reuse_prefix: bool = True,
        share_prefixes: bool = False,
        compile: str = "off",
    ):
        self.model = model
        self.compile = decoding.check_mode(compile)
        self.reuse_prefix = reuse_prefix
        self.share_prefixes = share_prefixes
        self.prefill_stats = {"computed": 0, "reused": 0}  # prompt positions prefilled / taken from another row
        self.tokenizer = tokenizer
        self.privileged = privileged
        self.batch_size = batch_size
        self.name = f"{'privileged' if privileged else 'local'}:{name}"
        self._eos = eos_token_ids(model, tokenizer)

    @classmethod
    def from_name(
        cls,
        name: str,
        privileged: bool,
        batch_size: int = 32,
        dtype: str = "float32",
        model=None,
        tokenizer=None,
        reuse_prefix: bool = True,
        share_prefixes: bool = False,
        compile: str = "off",
    ):
        if model is None or tokenizer is None:
            model, tokenizer = load_model(name, dtype)
        for p in model.parameters():
            p.requires_grad_(False)
        return cls(model, tokenizer, name, privileged, batch_size, reuse_prefix, share_prefixes, compile)

    def metrics(self) -> dict[str, float]:
        """Cumulative counters (logged as teacher/total_*): seconds spent compiling the decode step."""
        return {**super().metrics(), "teacher/compile_s": decoding.compile_seconds(self.model)}

    def prompt_text(self, req: ContinuationRequest) -> str:
        """Exactly what the teacher model reads: its chat template (a plain "Question/Answer" frame for a
        base model without one, after its BOS), then the student's prefix verbatim -- the completion
        protocol of ``teachers.protocols``, the same text an OpenAI-compatible server would get."""
        return in_process_prompt(req, privileged=self.privileged, tokenizer=self.tokenizer)

    @torch.no_grad()
    def continue_prefixes(self, requests: list[ContinuationRequest], spec: SamplingSpec) -> list[ContinuationResult]:
        if spec.temperature == 0 and spec.n > 1:
            raise ValueError("a greedy teacher (temperature 0) with n > 1 returns n identical continuations")
        results: list[ContinuationResult] = []
        per_call = max(1, self.batch_size // spec.n)
        tok = self.tokenizer
        tok.padding_side = "left"
        gen = GenerationConfig(
            do_sample=spec.temperature > 0,
            temperature=spec.temperature if spec.temperature > 0 else None,
            top_p=spec.top_p,
            top_k=0 if spec.temperature > 0 else None,
            max_new_tokens=spec.max_new_tokens,
            num_return_sequences=1 if self.reuse_prefix else spec.n,
            pad_token_id=tok.pad_token_id,
            eos_token_id=self._eos,
        )
        device = next(self.model.parameters()).device
        for i in range(0, len(requests), per_call):
            batch = requests[i : i + per_call]
            texts = [self.prompt_text(r) for r in batch]
            # the chat template already holds the special tokens: do not add a second BOS
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(mix_seed(spec.seed, i))
                out = self._generate(enc["input_ids"], enc["attention_mask"], gen, spec.n)
            new = out[:, enc["input_ids"].shape[1] :]  # (len(batch) * n, <= max_new_tokens)
            for j, req in enumerate(batch):
                rows = new[j * spec.n : (j + 1) * spec.n]
                conts, n_out = [], 0
                for row in rows.tolist():
                    cut = len(row)
                    for k, t in enumerate(row):
                        if t in self._eos:
                            cut = k
                            break
                    n_out += cut
                    conts.append(cast(str, tok.decode(row[:cut], skip_special_tokens=True)))  # one row: one str
                results.append(
                    ContinuationResult(
                        texts=conts,
                        prompt_tokens=int(enc["attention_mask"][j].sum()),
                        completion_tokens=n_out,
                    )
                )
        return results

    def _generate(self, ids: torch.Tensor, att: torch.Tensor, gen: GenerationConfig, n: int) -> torch.Tensor:
        """(B * n, P + new) sequences, samples of one request adjacent."""
        if not self.reuse_prefix:
            return decoding.generate(self.model, ids, att, gen, compile=self.compile)
        # Prefill all but the last prompt token once, repeat the cache n times, and let generate feed the
        # last token: its cache_position starts at P - 1, so no prompt token is computed twice.
        cache = self._shared_prefill(ids, att) if self.share_prefixes and ids.shape[1] > 1 else None
        if cache is None:
            cache = DynamicCache(config=self.model.config)
            self.model(
                input_ids=ids[:, :-1],
                attention_mask=att[:, :-1],
                position_ids=position_ids(att)[:, :-1],
                cache=cache,
                use_cache=True,
                logits_to_keep=1,  # only the cache is wanted, not (B, P, V) logits
            )
            self.prefill_stats["computed"] += int(att[:, :-1].sum())
        ids_n, att_n = ids.repeat_interleave(n, 0), att.repeat_interleave(n, 0)

        def plain() -> torch.Tensor:
            cache.batch_repeat_interleave(n)
            return self.model.generate(input_ids=ids_n, attention_mask=att_n, cache=cache, generation_config=gen)

        if not decoding.use_compiled(self.model, self.compile):
            return plain()
        length = decoding.static_cache_len(self.model, ids.shape[1] + gen.max_new_tokens)
        static = decoding.to_static_cache(self.model, cache, n, length)
        if static is None:  # not plain full attention: the dynamic cache and plain decode steps
            return plain()
        cgen = decoding.compiled_config(self.model, gen, ids.shape[1], own_cache=True)

        def compiled() -> torch.Tensor:
            return self.model.generate(input_ids=ids_n, attention_mask=att_n, cache=static, generation_config=cgen)

        return decoding.with_fallback(self.model, compiled, plain)

    def _row_cache(self, tokens: list[int], donor: tuple[list, list] | None, shared: int) -> tuple[list, list]:
        """Per-layer keys and values (1, H, len(tokens), D) of one unpadded row; the first ``shared``
        positions are sliced from ``donor``, the rest computed."""
        device = next(self.model.parameters()).device
        cache = DynamicCache(config=self.model.config)
        if shared:
            assert donor is not None  # a shared prefix has a donor row
            for layer, (k, v) in enumerate(zip(*donor, strict=True)):
                cache.update(k[:, :, :shared].clone(), v[:, :, :shared].clone(), layer)
        if shared < len(tokens):
            rest = torch.tensor([tokens[shared:]], device=device)
            pos = torch.arange(shared, len(tokens), device=device)[None]
            self.model(input_ids=rest, position_ids=pos, cache=cache, use_cache=True, logits_to_keep=1)
        layers = cast("list[DynamicLayer]", cache.layers)  # _shared_prefill admits plain full-attention layers only
        return [layer.keys for layer in layers], [layer.values for layer in layers]

    def _shared_prefill(self, ids: torch.Tensor, att: torch.Tensor) -> DynamicCache | None:
        """The left-padded cache of ``ids[:, :-1]`` with positions shared across rows (see the module
        docstring); None when the model's cache cannot be assembled this way (a layer that is not plain
        full attention: sliding window, recurrent state), decided before anything is computed."""
        from transformers.cache_utils import DynamicLayer

        if any(type(layer) is not DynamicLayer for layer in DynamicCache(config=self.model.config).layers):
            return None
        B, P = ids.shape
        rows = [ids[i, :-1][att[i, :-1].bool()].tolist() for i in range(B)]  # real prompt tokens but the last
        order = sorted(range(B), key=lambda i: -len(rows[i]))
        done: dict[int, tuple[list, list]] = {}
        computed = reused = 0
        for i in order:
            best, shared = None, 0
            for j in done:
                c = _common_prefix(rows[i], rows[j])
                if c > shared:
                    best, shared = j, c
            done[i] = self._row_cache(rows[i], done[best] if best is not None else None, shared)
            computed += len(rows[i]) - shared
            reused += shared
        first_k, first_v = done[order[0]]
        cache = DynamicCache(config=self.model.config)
        for layer in range(len(first_k)):
            shape_k = (B, *first_k[layer].shape[1:2], P - 1, first_k[layer].shape[-1])
            shape_v = (B, *first_v[layer].shape[1:2], P - 1, first_v[layer].shape[-1])
            keys = first_k[layer].new_zeros(shape_k)  # padding positions are masked: their values never count
            values = first_v[layer].new_zeros(shape_v)
            for i in range(B):
                L = len(rows[i])
                if L:
                    keys[i, :, P - 1 - L :] = done[i][0][layer][0]
                    values[i, :, P - 1 - L :] = done[i][1][layer][0]
            cache.update(keys, values, layer)
        self.prefill_stats["computed"] += computed
        self.prefill_stats["reused"] += reused
        return cache

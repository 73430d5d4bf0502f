"""An in-process llama.cpp teacher (``teacher.type=llamacpp``): a GGUF file read as it is, through
llama-cpp-python's low-level API.

The model file is the packaged one (or any ``.gguf`` path), used in place: no dequantized copy, no second file on
disk. Only its tokenizer is read into Hugging Face's tokenizer (from the same file's metadata), so the prompt is
the one :class:`omniopd.teachers.local.LocalTeacher` feeds (the chat template, then the student's prefix) and is
tokenized to the same ids.

Decoding. The requests of one call are decoded together: up to ``n_parallel`` sequences share one llama.cpp
context whose key/value cache is unified (one buffer of ``n_ctx`` cells; a cell can belong to several sequences).
The prompts are prefilled as a trie in one batch: a prompt token is computed once and belongs to every sequence
whose prompt passes through it, so the N samples of a request share one prefill and, with ``share_prefixes`` (the
default), so do the nested chunk prefixes of a trajectory and the question that the samples of one prompt share.
Then every live sequence advances one token per ``llama_decode``. A call whose sequences or cache cells exceed the
context is decoded in waves.

Exact sampling. llama.cpp's samplers are not used at all: the logits of each step are read back and a token is
drawn in numpy from softmax(logits / temperature), restricted to the top-p nucleus when top_p < 1 (the smallest
set of most probable tokens whose mass reaches top_p, renormalised). No top-k, min-p, repeat, presence or
frequency penalty, typical-p or mirostat is applied (``create_completion``'s defaults are top_k 40, min_p 0.05
and repeat penalty 1.1). :func:`sampling_probs` is the distribution a draw comes from; the test suite checks it
against the Hugging Face model dequantized from the same file and draws from it with a goodness-of-fit test.

Determinism. A request's draws depend on its own content and the spec's seed only (one random stream per
request and sample index, seeded from the response-cache key), never on the other requests of a call or the
order of the waves; the logits themselves are llama.cpp's, the same for the same batch layout and threads.

Cache and ledger. With ``cache`` (the default) each request's N texts are stored in the response cache of
:mod:`omniopd.teachers.cache` under the backend, the model file, the prompt tokens and the sampling parameters;
a rerun or a resumed run reads them back. A :class:`~omniopd.teachers.ledger.BudgetLedger` counts requests,
tokens, cache hits and latency (logged as ``teacher/total_*``) and stops the run at ``max_total_tokens``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

from omniopd.errors import ConfigError, ModelError
from omniopd.teachers.base import ContinuationRequest, ContinuationResult, SamplingSpec, Teacher
from omniopd.teachers.cache import CachedResponse, ResponseCache, cache_key
from omniopd.teachers.ledger import BudgetLedger
from omniopd.teachers.protocols import in_process_prompt

log = logging.getLogger(__name__)

BACKEND = "llamacpp"
_TOP_P_CANDIDATES = 1024  # the nucleus is looked for among this many most probable tokens first (exact fallback)


def sampling_probs(logits: np.ndarray, temperature: float, top_p: float = 1.0) -> np.ndarray:
    """The distribution a token is drawn from, per row of ``logits`` (..., V): softmax(logits / T) in float64,
    then, for top_p < 1, zero outside the smallest set of most probable tokens whose mass reaches top_p (the token
    that crosses it included) and renormalised. Temperature 0 is greedy: all mass on the argmax."""
    z = np.asarray(logits, dtype=np.float64)
    if temperature == 0:
        out = np.zeros_like(z)
        np.put_along_axis(out, z.argmax(-1)[..., None], 1.0, axis=-1)
        return out
    z = z / temperature
    z -= z.max(-1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(-1, keepdims=True)
    if top_p >= 1.0:
        return p
    flat = p.reshape(-1, p.shape[-1])
    for row in flat:
        k = min(_TOP_P_CANDIDATES, row.size)
        cand = np.argpartition(-row, k - 1)[:k] if k < row.size else np.arange(row.size)
        cand = cand[np.argsort(-row[cand], kind="stable")]
        cum = np.cumsum(row[cand])
        if cum[-1] < top_p and k < row.size:  # the nucleus is larger than the candidates: sort everything
            cand = np.argsort(-row, kind="stable")
            cum = np.cumsum(row[cand])
        keep = cand[: int(np.searchsorted(cum, top_p)) + 1]
        kept = row[keep]
        row[:] = 0.0
        row[keep] = kept / kept.sum()
    return p


def draw(probs: np.ndarray, rng: np.random.Generator) -> int:
    """One token from ``probs`` (V,) by inverse transform sampling (one uniform draw)."""
    cdf = np.cumsum(probs)
    return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), probs.size - 1))


def draw_rows(logits: np.ndarray, temperature: float, top_p: float, rngs: list[np.random.Generator]) -> list[int]:
    """One token per row of ``logits`` (k, V), row i with ``rngs[i]``: :func:`draw` of :func:`sampling_probs`, the
    rows at once where no nucleus is cut (the common case: the unnormalised cumulative sum of exp(logits / T) in
    float64, searched at u times its total). Single-threaded numpy on purpose: a second thread pool (torch's) left
    spinning slows llama.cpp's next decode more than it saves here."""
    if temperature == 0 or top_p < 1.0:
        probs = sampling_probs(logits, temperature, top_p)
        return [draw(p, rng) for p, rng in zip(probs, rngs, strict=True)]
    z = np.array(logits, dtype=np.float64)
    if temperature != 1.0:
        z /= temperature
    z -= z.max(-1, keepdims=True)
    np.exp(z, out=z)
    np.cumsum(z, axis=-1, out=z)
    last = z.shape[-1] - 1
    return [
        int(min(np.searchsorted(row, rng.random() * row[-1], side="right"), last))
        for row, rng in zip(z, rngs, strict=True)
    ]


@dataclass
class _Unit:
    """Up to ``n_parallel`` samples of one request, decoded in one wave."""

    request: int
    prompt: list[int]
    samples: range  # sample indices of the request
    rngs: list[np.random.Generator]

    def cells(self, max_new: int) -> int:
        return len(self.prompt) + len(self.samples) * max_new


class LlamaCppEngine:
    """One GGUF model and one llama.cpp context with a unified cache for ``n_parallel`` sequences."""

    def __init__(
        self,
        path: Path,
        *,
        n_ctx: int = 16384,
        n_parallel: int = 64,
        n_batch: int = 1024,
        n_threads: int | None = None,
        n_gpu_layers: int = 0,
        flash_attn: bool = False,
        unified: bool = True,
    ) -> None:
        """``unified``: one cache buffer for all sequences, whose cells they can share (prompt prefixes), and every
        token attends over all used cells, masked (cheap while the sequences share most of their prompt); False:
        ``n_ctx / n_parallel`` cells per sequence, each attending over its own (independent prompts: evaluation)."""
        try:
            import llama_cpp
            from llama_cpp import _internals, _logger
        except ImportError as err:
            raise ConfigError(
                "teacher.type=llamacpp needs llama-cpp-python: pip install 'omniopd[llamacpp]' "
                f'(built from source; CMAKE_ARGS="-DGGML_NATIVE=ON" for this CPU) ({err})'
            ) from None
        self._lib = llama_cpp
        _logger.set_verbose(log.isEnabledFor(logging.DEBUG))  # llama.cpp's own log: errors only, unless debugging
        llama_cpp.llama_backend_init()
        threads = n_threads or len(os.sched_getaffinity(0))
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = n_gpu_layers
        try:
            self.model = _internals.LlamaModel(path_model=str(path), params=mparams, verbose=False)
        except ValueError as err:
            raise ModelError(f"llama.cpp cannot load {path}: {err}") from None
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = n_batch
        cparams.n_ubatch = min(n_batch, 512)
        cparams.n_seq_max = n_parallel
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        cparams.kv_unified = unified
        cparams.flash_attn_type = 1 if flash_attn else 0
        cparams.no_perf = True
        self.ctx = _internals.LlamaContext(model=self.model, params=cparams, verbose=False)
        self.n_ctx, self.n_parallel, self.n_batch, self.unified = n_ctx, n_parallel, n_batch, unified
        self.vocab = llama_cpp.llama_model_get_vocab(self.model.model)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self.vocab))
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, n_parallel)
        self.prefill_stats = {"computed": 0, "reused": 0}

    def close(self) -> None:
        if getattr(self, "_batch", None) is not None:
            self._lib.llama_batch_free(self._batch)
            self._batch = None
        self.ctx.close()
        self.model.close()

    def is_eog(self, token: int) -> bool:
        return bool(self._lib.llama_vocab_is_eog(self.vocab, token))

    # -- low level ---------------------------------------------------------------------------------

    def _decode(self, entries: list[tuple[int, int, list[int], bool]]) -> np.ndarray:
        """Decode (token, position, sequences, wants logits) entries in one batch; the logits of the entries that
        want them, in order, as a (k, V) float32 array. A token given several sequences is computed once and
        belongs to each of them (their shared prompt prefix)."""
        b = self._batch
        for i, (tok, pos, seqs, out) in enumerate(entries):
            b.token[i] = tok
            b.pos[i] = pos
            b.n_seq_id[i] = len(seqs)
            for k, seq in enumerate(seqs):
                b.seq_id[i][k] = seq
            b.logits[i] = out
        b.n_tokens = len(entries)
        rc = self._lib.llama_decode(self.ctx.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc} (the context is full: raise teacher.n_ctx)")
        k = sum(1 for e in entries if e[3])
        if not k:
            return np.empty((0, self.n_vocab), dtype=np.float32)
        ptr = self._lib.llama_get_logits(self.ctx.ctx)
        return np.ctypeslib.as_array(cast(Any, ptr), shape=(k, self.n_vocab)).copy()

    def _prefill(self, prompts: list[list[int]], seqs: list[list[int]], share: bool) -> list[np.ndarray]:
        """Prefill prompt i into every sequence of ``seqs[i]``; the logits after each prompt's last token.

        The prompts are laid out as a trie (``share``) or one path each: a node is one batch entry, computed once
        and given the sequences of every prompt through it, so the N samples of a request and, with ``share``,
        the nested prefixes of a call's requests are prefilled once. Entries go in creation order (a node after
        its parent), ``n_batch`` at a time."""
        nodes: list[tuple[int, int, list[int]]] = []  # (token, position, sequences)
        last: list[int] = []  # the node of each prompt's last token
        root: dict = {}
        for prompt, sq in zip(prompts, seqs, strict=True):
            level = root if share else {}
            node = -1
            for pos, tok in enumerate(prompt):
                if tok not in level:
                    level[tok] = (len(nodes), {})
                    nodes.append((tok, pos, []))
                else:
                    self.prefill_stats["reused"] += 1
                node, level = level[tok]
                nodes[node][2].extend(sq)
            last.append(node)
        self.prefill_stats["computed"] += len(nodes)
        wanted = set(last)
        rows: dict[int, np.ndarray] = {}
        for lo in range(0, len(nodes), self.n_batch):
            chunk = range(lo, min(len(nodes), lo + self.n_batch))
            out = self._decode([(*nodes[i], i in wanted) for i in chunk])
            rows.update(zip([i for i in chunk if i in wanted], out, strict=True))
        return [rows[i] for i in last]

    # -- one wave ----------------------------------------------------------------------------------

    def generate(
        self,
        units: list[_Unit],
        *,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        share_prefixes: bool,
    ) -> list[list[list[int]]]:
        """The sampled token ids of each unit's samples (EOG excluded). One wave: the units fit the context."""
        lib = self._lib
        mem = lib.llama_get_memory(self.ctx.ctx)
        lib.llama_memory_clear(mem, True)
        base: list[int] = []  # first sequence id of each unit
        next_seq = 0
        for u in units:
            base.append(next_seq)
            next_seq += len(u.samples)
        if self.unified:
            seqs = [list(range(b, b + len(u.samples))) for b, u in zip(base, units, strict=True)]
            first = self._prefill([u.prompt for u in units], seqs, share_prefixes)
        else:  # a sequence's cells are its own: each sample is prefilled in its own stream
            per_sample = self._prefill(
                [u.prompt for u in units for _ in u.samples],
                [[b + j] for b, u in zip(base, units) for j in range(len(u.samples))],
                False,
            )
            starts = np.cumsum([0] + [len(u.samples) for u in units])[:-1]
            first = [per_sample[i] for i in starts]
        # decode: every live sequence one token per call
        out: list[list[list[int]]] = [[[] for _ in u.samples] for u in units]
        live: list[tuple[int, int]] = []  # (unit, sample)
        for ui, u in enumerate(units):
            same = np.broadcast_to(first[ui], (len(u.samples), self.n_vocab))  # N draws, one prefill
            for j, token in enumerate(draw_rows(same, temperature, top_p, u.rngs)):
                if self._take(out[ui][j], token, max_new_tokens):
                    live.append((ui, j))
        while live:
            entries = [
                (out[ui][j][-1], len(units[ui].prompt) + len(out[ui][j]) - 1, [base[ui] + j], True) for ui, j in live
            ]
            tokens = draw_rows(self._decode(entries), temperature, top_p, [units[ui].rngs[j] for ui, j in live])
            live = [
                (ui, j)
                for (ui, j), token in zip(live, tokens, strict=True)
                if self._take(out[ui][j], token, max_new_tokens)
            ]
        lib.llama_memory_clear(mem, True)
        return out

    def generate_continuous(
        self,
        units: list[_Unit],
        *,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        on_unit_done: Callable[[int], None] | None = None,
    ) -> list[list[list[int]]]:
        """:meth:`generate` with continuous batching, for a cache that is not unified (independent prompts): up to
        ``n_parallel`` sequences are live, and a finished sequence's slot takes the next waiting sample at once,
        its prompt prefilled in the same batch as the others' next tokens. ``on_unit_done(i)`` is called once all
        samples of unit i are finished."""
        lib = self._lib
        mem = lib.llama_get_memory(self.ctx.ctx)
        lib.llama_memory_clear(mem, True)
        waiting = deque((ui, j) for ui, u in enumerate(units) for j in range(len(u.samples)))
        left = [len(u.samples) for u in units]
        free = list(range(self.n_parallel - 1, -1, -1))
        live: dict[int, tuple[int, int]] = {}  # sequence -> (unit, sample)
        out: list[list[list[int]]] = [[[] for _ in u.samples] for u in units]
        fresh: set[int] = set()  # sequences whose prompt is in this batch: their first token comes from its end

        def finish(seq: int) -> None:
            ui, _ = live.pop(seq)
            lib.llama_memory_seq_rm(mem, seq, -1, -1)
            free.append(seq)
            left[ui] -= 1
            if left[ui] == 0 and on_unit_done is not None:
                on_unit_done(ui)

        while waiting or live:
            entries: list[tuple[int, int, list[int], bool]] = []
            owners: list[int] = []
            for seq, (ui, j) in live.items():
                toks = out[ui][j]
                entries.append((toks[-1], len(units[ui].prompt) + len(toks) - 1, [seq], True))
                owners.append(seq)
            fresh.clear()
            while waiting and free and len(entries) + len(units[waiting[0][0]].prompt) <= self.n_batch:
                ui, j = waiting.popleft()
                seq = free.pop()
                prompt = units[ui].prompt
                entries += [(tok, t, [seq], t == len(prompt) - 1) for t, tok in enumerate(prompt)]
                owners.append(seq)
                live[seq] = (ui, j)
                fresh.add(seq)
                self.prefill_stats["computed"] += len(prompt)
            if not entries:
                raise ConfigError(
                    f"a prompt of {len(units[waiting[0][0]].prompt)} tokens exceeds n_batch={self.n_batch}"
                )
            rngs = [units[live[seq][0]].rngs[live[seq][1]] for seq in owners]
            tokens = draw_rows(self._decode(entries), temperature, top_p, rngs)
            for seq, token in zip(owners, tokens, strict=True):
                ui, j = live[seq]
                if not self._take(out[ui][j], token, max_new_tokens):
                    finish(seq)
        lib.llama_memory_clear(mem, True)
        return out

    def _take(self, tokens: list[int], token: int, max_new: int) -> bool:
        """Append ``token`` unless it ends generation; whether the sequence goes on."""
        if self.is_eog(token):
            return False
        tokens.append(token)
        return len(tokens) < max_new

    def next_token_logits(self, prompt: list[int]) -> np.ndarray:
        """The logits (V,) after ``prompt``, for tests and diagnostics."""
        lib = self._lib
        mem = lib.llama_get_memory(self.ctx.ctx)
        lib.llama_memory_clear(mem, True)
        (row,) = self._prefill([prompt], [[0]], share=False)
        lib.llama_memory_clear(mem, True)
        return row


def plan_waves(
    units: list[_Unit], *, n_parallel: int, n_ctx: int, max_new: int, unified: bool = True
) -> list[list[_Unit]]:
    """Consecutive units grouped so that each wave's sequences fit ``n_parallel`` and its cells ``n_ctx`` (counted
    without prefix sharing, so the plan never depends on what is shared); without a unified cache every sequence
    has ``n_ctx // n_parallel`` cells of its own."""
    if not unified:
        per_seq = n_ctx // n_parallel
        for u in units:
            if len(u.prompt) + max_new > per_seq:
                raise ConfigError(
                    f"{len(u.prompt)} prompt tokens + {max_new} new ones exceed the {per_seq} cells of a sequence "
                    f"(n_ctx {n_ctx} / {n_parallel} sequences): raise n_ctx or lower n_parallel"
                )
    waves: list[list[_Unit]] = []
    seqs = cells = 0
    for u in units:
        need = u.cells(max_new) if unified else 0  # a sequence's own cells were checked above
        if need > n_ctx:
            raise ConfigError(
                f"teacher.n_ctx={n_ctx} cannot hold one request: {len(u.prompt)} prompt tokens + {len(u.samples)} "
                f"samples x {max_new} tokens = {need} cells; raise teacher.n_ctx or lower teacher.n_parallel"
            )
        if waves and seqs + len(u.samples) <= n_parallel and cells + need <= n_ctx:
            waves[-1].append(u)
            seqs += len(u.samples)
            cells += need
        else:
            waves.append([u])
            seqs, cells = len(u.samples), need
    return waves


class LlamaCppTeacher(Teacher):
    """``teacher.type=llamacpp``: continuations from a GGUF model run in-process by llama.cpp."""

    tokenizer: Any  # the model's Hugging Face tokenizer, read from the GGUF file

    def __init__(
        self,
        engine: LlamaCppEngine,
        tokenizer: Any,
        name: str,
        model_id: str,
        *,
        privileged: bool = False,
        share_prefixes: bool = True,
        cache_path: str | None = None,
        max_total_tokens: int | None = None,
    ) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.privileged = privileged
        self.share_prefixes = share_prefixes
        self.model_id = model_id  # the file's name and size: what the cache key names
        self.name = f"llamacpp{':privileged' if privileged else ''}:{name}"
        self.ledger = BudgetLedger(max_total_tokens=max_total_tokens)
        self.cache = ResponseCache(cache_path) if cache_path else None

    @classmethod
    def from_name(
        cls,
        name: str,
        *,
        privileged: bool = False,
        share_prefixes: bool = True,
        cache_path: str | None = None,
        max_total_tokens: int | None = None,
        **engine_options: Any,
    ) -> LlamaCppTeacher:
        """The teacher of a packaged name or .gguf path; ``engine_options`` are :class:`LlamaCppEngine`'s
        (n_ctx, n_parallel, n_batch, n_threads, n_gpu_layers, flash_attn)."""
        from omniopd.engine.models import gguf_file, load_gguf_tokenizer

        path = gguf_file(name)
        engine = LlamaCppEngine(path, **engine_options)
        model_id = f"{path.name}:{path.stat().st_size}"
        return cls(
            engine,
            load_gguf_tokenizer(path),
            name,
            model_id,
            privileged=privileged,
            share_prefixes=share_prefixes,
            cache_path=cache_path,
            max_total_tokens=max_total_tokens,
        )

    def prompt_text(self, req: ContinuationRequest) -> str:
        """The same text :meth:`LocalTeacher.prompt_text` gives: the chat template, then the prefix verbatim."""
        return in_process_prompt(req, privileged=self.privileged, tokenizer=self.tokenizer)

    def prompt_ids(self, req: ContinuationRequest) -> list[int]:
        return list(self.tokenizer(self.prompt_text(req), add_special_tokens=False)["input_ids"])

    def metrics(self) -> dict[str, float]:
        return {
            **self.ledger.snapshot(),
            "teacher/prefill_computed": float(self.engine.prefill_stats["computed"]),
            "teacher/prefill_reused": float(self.engine.prefill_stats["reused"]),
        }

    def continue_prefixes(self, requests: list[ContinuationRequest], spec: SamplingSpec) -> list[ContinuationResult]:
        if spec.temperature == 0 and spec.n > 1:
            raise ValueError("a greedy teacher (temperature 0) with n > 1 returns n identical continuations")
        started = time.perf_counter()
        prompts = [self.prompt_ids(r) for r in requests]
        sampling = {"temperature": spec.temperature, "top_p": spec.top_p, "seed": spec.seed, "n": spec.n}
        keys = [
            cache_key(BACKEND, self.model_id, {"prompt_ids": p, "max_new_tokens": spec.max_new_tokens}, sampling)
            for p in prompts
        ]
        results: list[ContinuationResult | None] = [None] * len(requests)
        todo: list[int] = []
        for i, key in enumerate(keys):
            hit = self.cache.get(key) if self.cache is not None else None
            if hit is not None and len(hit.texts) == spec.n:
                self.ledger.record_cache_hit()
                results[i] = ContinuationResult(list(hit.texts), hit.prompt_tokens, hit.completion_tokens)
            else:
                todo.append(i)
        units: list[_Unit] = []
        step = self.engine.n_parallel
        for i in todo:
            seed = int.from_bytes(hashlib.sha256(keys[i].encode()).digest()[:8], "little")
            for lo in range(0, spec.n, step):
                samples = range(lo, min(spec.n, lo + step))
                rngs = [np.random.default_rng([seed, j]) for j in samples]
                units.append(_Unit(i, prompts[i], samples, rngs))
        tokens: dict[int, list[list[int]]] = {i: [] for i in todo}
        for wave in plan_waves(units, n_parallel=step, n_ctx=self.engine.n_ctx, max_new=spec.max_new_tokens):
            self.ledger.check()
            for u in wave:
                self.ledger.record_request()
            outs = self.engine.generate(
                wave,
                max_new_tokens=spec.max_new_tokens,
                temperature=spec.temperature,
                top_p=spec.top_p,
                share_prefixes=self.share_prefixes,
            )
            for u, drawn in zip(wave, outs, strict=True):
                tokens[u.request].extend(drawn)
                if u.samples.stop == spec.n:  # the request's last unit: its result is whole
                    i = u.request
                    texts = [cast(str, self.tokenizer.decode(t, skip_special_tokens=True)) for t in tokens[i]]
                    n_out = sum(len(t) for t in tokens[i])
                    results[i] = ContinuationResult(texts, len(prompts[i]), n_out)
                    self.ledger.record_success(len(prompts[i]), n_out, time.perf_counter() - started)
                    if self.cache is not None:
                        self.cache.put(keys[i], BACKEND, self.model_id, CachedResponse(texts, len(prompts[i]), n_out))
        return [cast(ContinuationResult, r) for r in results]

    def next_token_probs(self, req: ContinuationRequest, spec: SamplingSpec) -> np.ndarray:
        """The distribution the first continuation token of ``req`` is drawn from (for the sampler test)."""
        return sampling_probs(self.engine.next_token_logits(self.prompt_ids(req)), spec.temperature, spec.top_p)

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()
        self.engine.close()

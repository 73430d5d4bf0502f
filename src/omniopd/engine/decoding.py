"""Decoding for the student's rollouts and the local teacher: Hugging Face ``generate``, plain or compiled,
and the statistics of the raw next-token distribution recorded while sampling.

Compiled decoding (``rollout.compile``: ``auto``, ``on``, ``off``) is transformers' own static-cache path:
``generate`` with ``cache_implementation="static"`` (or a static cache the caller filled, as the local teacher
does after its shared prefill) and a ``CompileConfig``; the prefill runs eagerly and every decode step goes
through ``torch.compile(model.__call__)``. ``off`` never compiles; ``on`` compiles on any device (CPU too);
``auto`` compiles on CUDA, where per-token launch overhead dominates a small model's decoding, and not on the
CPU, where transformers does not compile by default either. The static cache is sized in buckets of
:data:`CACHE_BUCKET` positions and never shrinks for a model, so later calls reuse the compiled graph (a new
batch size recompiles once, with the batch dimension made dynamic).

When compiling is unavailable (sharded parameters) or fails, the same batch is decoded again on the plain
path from the same random state, the model stays on the plain path, and the reason is logged once. The
seconds spent compiling are counted apart (:func:`compile_seconds`; ``time/compile_s`` in the step metrics).

Sampling is unchanged: the same logits processors in the same order and one ``torch.multinomial`` per step
over the batch, so for a fixed seed the compiled path draws the same tokens as the plain one wherever the
compiled kernels round the logits alike; where a fused kernel rounds differently, a draw that falls on the
boundary between two tokens may pick the neighbour (``tests/test_decoding.py`` checks equality on a tiny model).

:class:`RawTokenStats` is a logits processor that sees the unmodified logits (it runs before temperature and
top_p) and reduces each step to (B,) values: the entropy H_t over the full vocabulary and log p(y_t) of the
token drawn, in fp32 -- what the audit's anchor scheduler and p_bar need, without a second forward.
"""

from __future__ import annotations

import copy
import logging
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import CompileConfig, GenerationConfig, LogitsProcessor, LogitsProcessorList, StaticCache
from transformers.cache_utils import StaticLayer
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from omniopd.errors import ConfigError

log = logging.getLogger(__name__)

COMPILE_MODES = ("auto", "on", "off")
CACHE_BUCKET = 256  # static cache lengths are rounded up to a multiple of this (fewer recompiles)

# Generation-config keys a checkpoint may set that add no logits processor (transformers fills every key our
# own config leaves unset from the checkpoint's generation_config; any other key could shape the logits
# before RawTokenStats sees them).
_NEUTRAL_KEYS = frozenset(
    {
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "decoder_start_token_id",
        "use_cache",
        "output_attentions",
        "output_hidden_states",
        "output_scores",
        "output_logits",
        "return_dict_in_generate",
        "transformers_version",
        "_from_model_config",
        "do_sample",
        "temperature",
        "top_k",
        "top_p",
        "max_length",
        "max_new_tokens",
        "num_return_sequences",
        "cache_implementation",
        "num_beams",
    }
)


@dataclass
class _State:
    disabled: str | None = None  # why this model decodes on the plain path from now on
    compile_s: float = 0.0  # seconds spent compiling its decode step
    cache_len: int = 0  # the longest static cache built for it (never shrinks: no recompile for a shorter one)
    noted: bool = False  # the choice of path has been logged


_STATES: "weakref.WeakKeyDictionary[torch.nn.Module, _State]" = weakref.WeakKeyDictionary()


def _state(model) -> _State:
    if model not in _STATES:
        _STATES[model] = _State()
    return _STATES[model]


def check_mode(mode: str) -> str:
    if mode not in COMPILE_MODES:
        raise ConfigError(f"compile={mode!r}: expected one of {', '.join(COMPILE_MODES)}")
    return mode


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _unavailable(model) -> str | None:
    """Why the compiled path cannot run for ``model``, or None."""
    if not hasattr(torch, "compile"):
        return "this torch has no torch.compile"
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without DTensor has no sharded parameters either
        return None
    if any(isinstance(p, DTensor) for p in model.parameters()):
        return "the model's parameters are sharded (DTensor)"
    return None


def use_compiled(model, mode: str) -> bool:
    """Whether :func:`generate` decodes ``model`` on the compiled path under ``mode``; a refusal is logged once."""
    if check_mode(mode) == "off":
        return False
    st = _state(model)
    if st.disabled is None and mode == "auto" and _device(model).type != "cuda":
        return False  # auto: compile on CUDA only
    if st.disabled is None:
        st.disabled = _unavailable(model)
        if st.disabled is not None:
            log.warning(
                "compiled decoding is unavailable for %s (%s); decoding on the plain path",
                type(model).__name__,
                st.disabled,
            )
    return st.disabled is None


def compile_seconds(model) -> float:
    """Seconds spent so far compiling ``model``'s decode step (0.0 if it never compiled)."""
    st = _STATES.get(model)
    return st.compile_s if st is not None else 0.0


def _compile_clock() -> float:
    """Dynamo's cumulative compile wall time in seconds (private counters; 0.0 where this torch lacks them)."""
    try:
        from torch._dynamo.utils import calculate_time_spent

        return float(calculate_time_spent().get("total_wall_time", 0.0))
    except Exception:  # noqa: BLE001 - a missing private counter only loses the report, never the decoding
        return 0.0


def compile_config(model) -> CompileConfig:
    """transformers' compile settings for ``model``'s device: CUDA graphs on CUDA, plain inductor elsewhere."""
    cuda = _device(model).type == "cuda"
    cfg = CompileConfig(fullgraph=False, dynamic=None, mode="reduce-overhead" if cuda else "default")
    if not cuda:
        # transformers compiles off CUDA only when asked (its class declares this private flag as None)
        cfg._compile_all_devices = True  # type: ignore[assignment]
    return cfg


def static_cache_len(model, length: int) -> int:
    """The static cache length for a call needing ``length`` positions: a bucket, never shorter than before."""
    st = _state(model)
    st.cache_len = max(st.cache_len, -(-length // CACHE_BUCKET) * CACHE_BUCKET)
    return st.cache_len


def compiled_config(model, gen: GenerationConfig, prompt_len: int, *, own_cache: bool) -> GenerationConfig:
    """A copy of ``gen`` for the compiled path; transformers builds the static cache unless ``own_cache``."""
    out = copy.deepcopy(gen)
    out.compile_config = compile_config(model)
    if not own_cache:
        out.cache_implementation = "static"
        out.max_cache_len = static_cache_len(model, prompt_len + gen.max_new_tokens)
    return out


def with_fallback(
    model, compiled: Callable[[], Tensor], plain: Callable[[], Tensor], processors: LogitsProcessorList | None = None
) -> Tensor:
    """``compiled()``, timing its compilation; if it raises, ``plain()`` from the same random state (the
    processors reset) and the model stays on the plain path. Both must decode the same batch."""
    st = _state(model)
    device = _device(model)
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    t0 = _compile_clock()
    try:
        out = compiled()
    except Exception as err:  # noqa: BLE001 - any compiler failure falls back to the plain path
        first = (str(err).strip().splitlines() or [""])[0][:200]
        st.disabled = f"{type(err).__name__}: {first}"
        log.warning(
            "compiled decoding failed for %s (%s); decoding on the plain path from here on",
            type(model).__name__,
            st.disabled,
        )
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng, device)
        for p in processors or []:
            if isinstance(p, RawTokenStats):
                p.reset()
        return plain()
    spent = _compile_clock() - t0
    if spent > 0:
        st.compile_s += spent
        log.info(
            "compiled decoding for %s: compiled in %.1f s (%.1f s in all)", type(model).__name__, spent, st.compile_s
        )
    elif not st.noted:
        log.info("compiled decoding for %s: reusing compiled graphs", type(model).__name__)
    st.noted = True
    return out


def generate(
    model,
    input_ids: Tensor,
    attention_mask: Tensor,
    gen: GenerationConfig,
    *,
    compile: str = "off",
    logits_processor: LogitsProcessorList | None = None,
) -> Tensor:
    """``model.generate`` on the path ``compile`` selects (see the module docstring)."""

    def plain() -> Tensor:
        return model.generate(
            input_ids=input_ids, attention_mask=attention_mask, generation_config=gen, logits_processor=logits_processor
        )

    if not use_compiled(model, compile):
        return plain()
    cgen = compiled_config(model, gen, input_ids.shape[1], own_cache=False)

    def compiled() -> Tensor:
        return model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=cgen,
            logits_processor=logits_processor,
        )

    return with_fallback(model, compiled, plain, logits_processor)


def to_static_cache(model, cache, repeat: int, max_cache_len: int) -> StaticCache | None:
    """A static cache holding ``cache``'s keys and values with every row repeated ``repeat`` times (the layout
    ``batch_repeat_interleave`` gives), or None when a layer is not plain full attention (sliding window,
    recurrent state): then the caller keeps its dynamic cache."""
    static = StaticCache(config=model.config, max_cache_len=max_cache_len)
    layers = getattr(cache, "layers", None)
    if (
        layers is None
        or len(layers) != len(static.layers)
        or any(type(lay) is not StaticLayer for lay in static.layers)
    ):
        return None
    for i, layer in enumerate(layers):
        static.update(layer.keys.repeat_interleave(repeat, 0), layer.values.repeat_interleave(repeat, 0), i)
    return static


# ------------------------------------------------------------------------------------------ raw statistics


class RawTokenStats(LogitsProcessor):
    """Records, at every decoding step, the entropy of the logits it is given and (one step later, once the
    token is known) the log-probability of the token drawn, both over the full vocabulary in fp32, reduced to
    (B,) at once: the step's (B, V) log-softmax is the only vocabulary-sized tensor kept, until the next step.
    It returns the logits untouched. Placed first, it sees the model's unmodified distribution."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._entropy: list[Tensor] = []  # (B,) per step
        self._chosen: list[Tensor] = []  # (B,) log p of the token drawn at that step
        self._logp: Tensor | None = None  # the last step's (B, V) log-softmax

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self._logp is not None:  # input_ids now ends with the token drawn from the previous step
            self._chosen.append(self._logp.gather(-1, input_ids[:, -1:]).squeeze(-1))
        logp = F.log_softmax(scores.float(), dim=-1)
        self._entropy.append(-(logp.exp() * logp).sum(-1))  # the same arithmetic as core.token_stats
        self._logp = logp
        return scores

    def result(self, new_tokens: Tensor) -> tuple[Tensor, Tensor]:
        """(entropy, log p(token)), each (B, T) fp32 on the CPU, for the T generated columns ``new_tokens``
        (steps that ``generate`` ran and then dropped, as a deferred stop check may, are left out)."""
        T = new_tokens.shape[1]
        if T == 0 or not self._entropy:
            empty = torch.zeros(new_tokens.shape[0], 0)
            return empty, empty.clone()
        if len(self._chosen) < T:  # the last kept step's token was never fed back
            assert self._logp is not None  # set by every step that recorded an entropy
            self._chosen.append(self._logp.gather(-1, new_tokens[:, T - 1 : T].to(self._logp.device)).squeeze(-1))
        ent = torch.stack(self._entropy[:T], dim=1).cpu()
        chosen = torch.stack(self._chosen[:T], dim=1).cpu()
        self._logp = None
        return ent, chosen


def inherited_processors(model) -> list[str]:
    """The keys of ``model``'s generation config that could add a logits processor ahead of the sampling
    warpers (transformers applies a checkpoint's repetition_penalty, for instance, even with our own config)."""
    diff = model.generation_config.to_diff_dict()
    return sorted(k for k, v in diff.items() if k not in _NEUTRAL_KEYS and v is not None)


def raw_stats_sampling(gen: GenerationConfig) -> tuple[GenerationConfig, LogitsProcessorList, RawTokenStats]:
    """``gen`` rearranged so that a :class:`RawTokenStats` sees the raw logits: temperature and top_p move from
    the config to a processor list [stats, temperature, top_p] -- the warpers ``generate`` would build from
    ``gen`` (top_k is 0: none), in its order, so the draws are the same."""
    stats = RawTokenStats()
    procs = LogitsProcessorList([stats])
    if not gen.do_sample:
        return gen, procs, stats
    out = copy.deepcopy(gen)
    if gen.temperature is not None and gen.temperature != 1.0:
        procs.append(TemperatureLogitsWarper(gen.temperature))
    if gen.top_k not in (None, 0):
        raise ValueError(f"top_k={gen.top_k}: rollouts sample with top_k=0 (the full distribution)")
    if gen.top_p is not None and gen.top_p < 1.0:
        procs.append(TopPLogitsWarper(top_p=gen.top_p))
    out.temperature, out.top_p = 1.0, 1.0  # set, not None: a checkpoint's values would fill None
    return out, procs, stats

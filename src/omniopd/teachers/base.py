"""The teacher contract: "continue this text prefix for about C tokens, N samples, temperature T".

A teacher never returns logits. It gets the task (the student's question, and for a privileged
teacher the reference solution) and the student's partial answer as *text*, and returns N sampled
continuations as text. Each backend decides how to honour the contract (raw completion, chat with a
prefilled assistant turn, an instruction); the audit cuts and scores the text the same way for all.

A result holds exactly ``n`` texts or an ``error``. A short result is never scored as if complete:
the audit drops that chunk and counts it (``teacher/failed_chunks``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from omniopd.config import RunConfig


@dataclass(frozen=True)
class ContinuationRequest:
    question: str  # the task as the student saw it (before the chat template)
    prefix: str  # the student's partial answer y_<t, decoded text; the teacher continues it
    reference: str | None = None  # privileged information; only privileged teachers use it
    trajectory: int = 0  # requests with the same trajectory have nested prefixes
    instruction: str | None = None  # the answer-format instruction after the question; None: math default


@dataclass(frozen=True)
class SamplingSpec:
    n: int  # N continuations per request
    max_new_tokens: int  # in the teacher's own tokens
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0


@dataclass
class ContinuationResult:
    texts: list[str] = field(default_factory=list)  # exactly SamplingSpec.n on success
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class Teacher(ABC):
    """Text in, text out. ``name`` is recorded with every audit so runs can be compared."""

    name: str
    tokenizer = None  # set by local backends that can count tokens; None for APIs

    @abstractmethod
    def continue_prefixes(self, requests: list[ContinuationRequest], spec: SamplingSpec) -> list[ContinuationResult]:
        """One result per request, in order."""

    def metrics(self) -> dict[str, float]:
        """Cumulative backend counters (requests, retries, cost, ...); empty for in-process teachers."""
        return {}

    def close(self) -> None:  # noqa: B027 - optional hook
        pass


API_BACKENDS = {
    "openai-completions": ("omniopd.teachers.openai_backend", "OpenAICompletionsTeacher", "openai"),
    "openai-chat": ("omniopd.teachers.openai_backend", "OpenAIChatTeacher", "openai"),
    "anthropic": ("omniopd.teachers.anthropic_backend", "AnthropicTeacher", "anthropic"),
    "gemini": ("omniopd.teachers.gemini_backend", "GeminiTeacher", "gemini"),
}


def build_teacher(cfg: "RunConfig", student=None, student_tokenizer=None) -> Teacher:
    """Build the configured backend. A local teacher on the student's own base model reuses the
    weights of ``student`` (the frozen reference copy), so no third copy is loaded."""
    import importlib
    import os
    from pathlib import Path

    from omniopd.errors import ConfigError

    t = cfg.teacher
    if t.type in ("local", "privileged"):
        from omniopd.teachers.local import LocalTeacher

        same = t.model in (None, cfg.student.name)
        return LocalTeacher.from_name(
            t.model or cfg.student.name,
            privileged=t.type == "privileged",
            batch_size=t.batch_size,
            dtype=t.dtype,
            reuse_prefix=t.reuse_prefix,
            share_prefixes=t.share_prefixes,
            model=student if same else None,
            tokenizer=student_tokenizer if same else None,
        )
    module_name, class_name, extra = API_BACKENDS[t.type]
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except ImportError as err:
        raise ConfigError(f"teacher.type={t.type} needs the {extra} SDK: pip install 'omniopd[{extra}]' ({err})") from None
    cache_path = None
    if t.cache:
        cache_root = Path(os.environ.get("OMNIOPD_CACHE", Path.home() / ".cache" / "omniopd"))
        cache_path = t.cache_path or str(cache_root / "teacher-cache.sqlite")
    options = {
        "model": t.model, "base_url": t.base_url, "privileged": t.privileged,
        "max_concurrency": t.max_concurrency, "timeout_s": t.timeout_s, "max_retries": t.max_retries,
        "price_input_per_mtok": t.price_input_per_mtok, "price_output_per_mtok": t.price_output_per_mtok,
        "max_cost_usd": t.max_cost_usd, "max_total_tokens": t.max_tokens, "cache_path": cache_path,
    }
    if t.api_key_env:
        options["api_key_env"] = t.api_key_env
    if t.type == "openai-completions" and t.tokenizer:
        options["tokenizer"] = t.tokenizer
    options.update(t.options)
    return cls.from_options(**options)

"""Building the configured teacher: the backend table and :func:`build_teacher`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from omniopd.teachers.base import Teacher

if TYPE_CHECKING:
    from omniopd.config import RunConfig

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

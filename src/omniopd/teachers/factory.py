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
    """Build the configured backend from the teacher config's fields, by name (``backend_options``). A local
    teacher on the student's own base model reuses the weights of ``student`` (the frozen reference copy), so
    no third copy is loaded."""
    import importlib
    import os
    from pathlib import Path

    from omniopd.errors import ConfigError
    from omniopd.teacher_config import LocalTeacherConfig, PrivilegedTeacherConfig

    t = cfg.teacher
    if isinstance(t, (LocalTeacherConfig, PrivilegedTeacherConfig)):
        from omniopd.teachers.local import LocalTeacher

        same = t.model in (None, cfg.student.name)
        return LocalTeacher.from_name(
            t.model or cfg.student.name,
            privileged=t.type == "privileged",
            model=student if same else None,
            tokenizer=student_tokenizer if same else None,
            compile=cfg.rollout.compile,  # compiled decoding: one switch for every in-process model
            **t.backend_options(),
        )
    module_name, class_name, extra = API_BACKENDS[t.type]
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except ImportError as err:
        raise ConfigError(
            f"teacher.type={t.type} needs the {extra} SDK: pip install 'omniopd[{extra}]' ({err})"
        ) from None
    cache_path = None
    if t.cache:
        cache_root = Path(os.environ.get("OMNIOPD_CACHE", Path.home() / ".cache" / "omniopd"))
        cache_path = t.cache_path or str(cache_root / "teacher-cache.sqlite")
    return cls.from_options(**{**t.backend_options(), "cache_path": cache_path})

"""Building the configured teacher (:func:`build_teacher`); each API teacher config class names its backend."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from omniopd.teachers.base import Teacher

if TYPE_CHECKING:
    from omniopd.config import RunConfig


def build_teacher(cfg: "RunConfig", student=None, student_tokenizer=None) -> Teacher:
    """Build the configured backend from the teacher config's fields, by name (``backend_options``). A local
    teacher on the student's own base model reuses the weights of ``student`` (the frozen reference copy), so
    no third copy is loaded."""
    import importlib

    from omniopd.config.teachers import LlamaCppTeacherConfig, LocalTeacherConfig, PrivilegedTeacherConfig
    from omniopd.errors import ConfigError

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
    if isinstance(t, LlamaCppTeacherConfig):
        from omniopd.teachers.llamacpp import LlamaCppTeacher

        options = t.backend_options()
        return LlamaCppTeacher.from_name(t.model or cfg.student.name, **{**options, "cache_path": _cache_path(t)})
    module_name, class_name, extra = t.backend  # each API teacher config names its backend (config.teachers)
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except ImportError as err:
        raise ConfigError(
            f"teacher.type={t.type} needs the {extra} SDK: pip install 'omniopd[{extra}]' ({err})"
        ) from None
    return cls.from_options(**{**t.backend_options(), "cache_path": _cache_path(t)})


def _cache_path(t) -> str | None:
    """The response cache file of a teacher config with ``cache``/``cache_path``; None with the cache off."""
    if not t.cache:
        return None
    cache_root = Path(os.environ.get("OMNIOPD_CACHE", Path.home() / ".cache" / "omniopd"))
    return t.cache_path or str(cache_root / "teacher-cache.sqlite")

"""The arms of a comparison: their configs (the shared budget enforced), departures, and training each in its own process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from omniopd.config import RunConfig, apply_overrides, build_config, dump_config, read_recipe, set_dotted
from omniopd.errors import ConfigError
from omniopd.methods import METHODS, Method
from omniopd.methods.opd import NOT_APPLICABLE as NOT_APPLICABLE_OPD  # noqa: F401 - the status of such a row

BASE = "base"  # the pseudo-method of an arm that is not trained: the student as it is

# settings every arm shares: an arm that changed them would not be compared on the same budget
SHARED_KEYS = (
    "student",
    "seed",
    "max_steps",
    "optim.prompts_per_step",
    "rollout.samples_per_prompt",
    "data",
    "eval",
    "output_dir",
    "method",
    "compare",
    "resume",
)


# ------------------------------------------------------------------------------------------ configs


def is_base(variant) -> bool:
    """The arm (a ``compare.variants`` entry or a result row) is the untrained student."""
    method = variant["method"] if isinstance(variant, dict) else variant.method
    return method == BASE


def method_of(cfg: RunConfig) -> Method:
    return METHODS[cfg.method]


def _flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 1e-4}} -> {"optim.lr": 1e-4}, so every override is checked and applied by its full key."""
    out: dict[str, Any] = {}
    for k, v in mapping.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _touches(key: str, shared: str) -> bool:
    return key == shared or key.startswith(shared + ".") or shared.startswith(key + ".")


def variant_configs(recipe: str | Path, overrides: list[str]) -> tuple[RunConfig, dict[str, RunConfig | None]]:
    """The recipe's config and one validated config per arm (None for ``base``); raises on any bad arm."""
    data = apply_overrides(read_recipe(recipe), overrides)
    cfg = build_config(data)
    if not cfg.compare.variants:
        raise ConfigError(
            "compare.variants: empty; list the arms to compare, e.g. [{name: base, method: base}, {name: sft, method: sft}]"
        )
    out = Path(cfg.output_dir)
    arm_data = {k: v for k, v in data.items() if k != "compare"}
    configs: dict[str, RunConfig | None] = {}
    for v in cfg.compare.variants:
        stage: dict[str, Any] = {}
        if v.init_from is not None:
            parent = configs.get(v.init_from, ...)
            if parent is ...:
                raise ConfigError(
                    f"compare variant {v.name}: init_from {v.init_from!r} is not an arm listed before it "
                    f"(arms so far: {', '.join(configs) or 'none'})"
                )
            if parent is None:
                raise ConfigError(f"compare variant {v.name}: init_from {v.init_from!r} is the untrained base arm")
            stage = {
                "student.name": str(Path(parent.output_dir) / "final"),
                "student.base_gguf": parent.student.gguf_template,
            }
        flat = _flatten(v.overrides)
        bad = [k for k in flat for s in SHARED_KEYS if _touches(k, s)]
        if bad:
            raise ConfigError(
                f"compare variant {v.name}: '{bad[0]}' must be the same for every arm (set it in the recipe, not in a variant)"
            )
        if is_base(v):
            if v.init_from is not None:
                raise ConfigError(f"compare variant {v.name}: method base (no training) cannot start from another arm")
            if v.overrides:
                raise ConfigError(f"compare variant {v.name}: method base (no training) takes no overrides")
            configs[v.name] = None
            continue
        fixed = {
            "method": v.method,
            "output_dir": str(out / "runs" / v.name),
            "eval.before": False,
            "eval.after": False,
            "resume": "auto",
            **stage,
        }
        try:
            configs[v.name] = build_config(set_dotted(set_dotted(arm_data, flat), fixed))
        except ConfigError as err:
            raise ConfigError(f"compare variant {v.name}: {err}") from None
    return cfg, configs


def departures(cfg: RunConfig | None) -> list[str]:
    """What makes this arm differ from the paper's method or the baselines' usual form (labelled), and the
    settings its method names (sft's source, opd's estimator); none for ``base``."""
    if cfg is None:
        return []
    method = method_of(cfg)
    stage = []
    if (parent := stage_parent(cfg)) is not None:
        stage = [f"starts from {parent.name}'s final weights (the KL anchor's reference: those weights)"]
    return stage + method.departures(cfg) + method.labels(cfg)


def stage_parent(cfg: RunConfig) -> Path | None:
    """The run directory an arm's student comes from (a second stage: ``init_from``), or None."""
    path = Path(cfg.student.name)
    if path.name == "final" and cfg.student.base_gguf is not None:
        return path.parent
    return None


def _parent_mark(cfg: RunConfig) -> str | None:
    """Which first stage the arm starts from: the sha256 of that finished arm's config (the run-control fields
    left out), or None while it has not finished. A first stage trained again with the same config (its weights
    restored in a new checkout) is the same stage; one trained with another config is not."""
    import hashlib

    import yaml

    from omniopd.config import normalized

    parent = stage_parent(cfg)
    if parent is None or not (parent / "summary.json").is_file() or not (parent / "config.yaml").is_file():
        return None
    try:
        saved = _without(normalized(yaml.safe_load((parent / "config.yaml").read_text())), _RUN_CONTROL)
    except (OSError, yaml.YAMLError):
        return None
    return hashlib.sha256(json.dumps(saved, sort_keys=True).encode()).hexdigest()


def weights_digest(final: Path) -> str:
    """The sha256 of a model directory's weight files (``*.safetensors``, in name order)."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(final.glob("*.safetensors")):
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def restore_final(parent: Path, log_path: Path, env: dict[str, str]) -> str:
    """Train a finished arm again from its saved config, only to bring back its ``final/`` (a results folder is
    committed without the weights); its results stay the ones measured. Returns what happened, in one line,
    with whether the weights equal the ones measured (``final.sha256``, written when the arm finished)."""
    scratch = parent / "restore"
    shutil.rmtree(scratch, ignore_errors=True)
    with log_path.open("a", encoding="utf-8") as log:
        log.write(f"omniopd compare: {parent.name}'s final/ is not here: training it again from its config.yaml\n")
        log.flush()
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "omniopd",
                "train",
                str(parent / "config.yaml"),
                f"output_dir={scratch}",
                "--overwrite",
                "--no-progress",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            stdin=subprocess.DEVNULL,
        )
    if proc.returncode != 0 or not (scratch / "final" / "config.json").is_file():
        raise RuntimeError(f"training {parent.name} again failed (exit {proc.returncode}): see {log_path}")
    shutil.move(str(scratch / "final"), str(parent / "final"))
    shutil.rmtree(scratch, ignore_errors=True)
    digest, recorded = weights_digest(parent / "final"), parent / "final.sha256"
    same = recorded.is_file() and recorded.read_text().strip() == digest
    return f"{parent.name}'s final/ trained again: " + (
        "the same weights as measured" if same else "weights differ from the ones measured (or were not recorded)"
    )


# ------------------------------------------------------------------------------------------ training


def _last_error(log: str) -> str:
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    errs = [ln for ln in lines if ln.startswith("omniopd: error:")]
    if errs:
        return errs[-1].removeprefix("omniopd: error:").strip()
    tb = [ln for ln in lines if not ln.startswith(("File ", "^", "~"))]
    return tb[-1][:300] if tb else "no output"


def _final_answer_share(records: list[dict]) -> dict:
    """Share of answers that state a final answer explicitly (``#### x`` or ``\\boxed{x}``), whether or
    not it is right; an answer graded only through its last number does not count."""
    from omniopd.evaluation.mathgrade import extract_answer
    from omniopd.evaluation.measures import share

    return share([extract_answer(r["output"]).rule in ("hash", "boxed") for r in records])


# run-control fields that do not change what an arm trains (dotted: one key of a section)
_RUN_CONTROL = ("checkpoint", "resume", "report_to", "rollout.compile")


def _without(config: dict, keys: tuple[str, ...]) -> dict:
    """``config`` less the top-level or dotted ``keys``."""
    out = {k: v for k, v in config.items() if k not in keys}
    for key in keys:
        section, _, field = key.partition(".")
        if field and isinstance(out.get(section), dict):
            out[section] = {k: v for k, v in out[section].items() if k != field}
    return out


def _same_config(path: Path, cfg: RunConfig, ignore: tuple[str, ...] = _RUN_CONTROL) -> bool:
    """The arm's saved config equals ``cfg`` but for ``ignore`` (read through the current schema: a field added
    to omniopd since that run was trained counts at its default, so upgrading does not retrain every arm)."""
    import yaml

    from omniopd.config import normalized

    try:
        saved = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return False
    current = cfg.model_dump(mode="json")
    return _without(normalized(saved), ignore) == _without(current, ignore)


def _resumable(cfg: RunConfig) -> Path | None:
    """The newest checkpoint of an unfinished arm trained with this config, or None (any other checkpoints,
    written under another config, are removed so the arm trains from the start)."""
    from omniopd.training.checkpoint import checkpoint_root, list_checkpoints

    ckpts = list_checkpoints(Path(cfg.output_dir))
    if ckpts and _same_config(ckpts[-1] / "config.yaml", cfg):
        return ckpts[-1]
    shutil.rmtree(checkpoint_root(Path(cfg.output_dir)), ignore_errors=True)
    return None


def arm_finished(cfg: RunConfig) -> bool:
    """Whether the arm's run finished with this config (its summary.json is written last)."""
    run_dir = Path(cfg.output_dir)
    if stage_parent(cfg) is not None:  # a second stage is finished only on the first stage it started from
        mark = run_dir / "init_from.json"
        if not mark.is_file() or json.loads(mark.read_text()).get("config_sha256") != _parent_mark(cfg):
            return False
    return (
        (run_dir / "summary.json").is_file()
        and (run_dir / "config.yaml").is_file()
        and _same_config(run_dir / "config.yaml", cfg)
    )


def train_arm(name: str, cfg: RunConfig, out: Path, *, rerun: bool, keep_checkpoints: bool = False) -> dict:
    run_dir = Path(cfg.output_dir)
    text = dump_config(cfg)
    summary_path = run_dir / "summary.json"
    if not rerun and arm_finished(cfg):
        # a finished arm; its final/ may be gone (a results folder committed without the weights): its
        # measures are then read from the cache, keyed by the run's summary, not by the model files
        s = json.loads(summary_path.read_text())
        kept = (run_dir / "final").is_dir()
        return {
            "status": "ok (reused)" if kept else "ok (reused results; final/ not kept)",
            "train_wall_s": s.get("wall_time_s"),
            "teacher_tokens": s.get("teacher_tokens"),
            "teacher_requests": s.get("teacher_requests"),
            "steps": s.get("steps"),
            "model": str(run_dir / "final"),
        }
    log_path = out / "logs" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    src = str(Path(__file__).resolve().parents[2])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([src, *filter(None, [os.environ.get("PYTHONPATH")])]),
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
    }
    restored = ""
    if (parent := stage_parent(cfg)) is not None:
        mark = _parent_mark(cfg)
        if mark is None:
            return {
                "status": f"failed: it starts from {parent.name}, which has not finished (train it first)",
                "model": None,
            }
        if not (parent / "final" / "config.json").is_file():
            try:
                restored = restore_final(parent, out / "logs" / f"{parent.name}.log", env)
            except RuntimeError as err:
                return {"status": f"failed: {err}", "model": None}
        from omniopd.training.checkpoint import checkpoint_root

        marker = run_dir / "init_from.json"
        if not marker.is_file() or json.loads(marker.read_text()).get("config_sha256") != mark:
            shutil.rmtree(checkpoint_root(run_dir), ignore_errors=True)  # begun on another first stage: start over
            run_dir.mkdir(parents=True, exist_ok=True)
            marker.write_text(json.dumps({"run": str(parent), "config_sha256": mark}, indent=2))
    cfg_path = out / "configs" / f"{name}.yaml"
    cfg_path.parent.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(text)
    summary_path.unlink(missing_ok=True)
    if rerun:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    resumed = _resumable(cfg)  # an arm stopped part-way (a session that ended) continues from its checkpoint
    if resumed is not None:
        say = f"resuming from {resumed.name}"
        log_mode = "a"
    else:
        say, log_mode = "", "w"
    t0 = time.perf_counter()
    with log_path.open(log_mode, encoding="utf-8") as log:
        if restored:
            log.write(f"omniopd compare: {restored}\n")
        if say:
            log.write(f"omniopd compare: {say}\n")
            log.flush()
        proc = subprocess.run(
            [sys.executable, "-m", "omniopd", "train", str(cfg_path), "--overwrite", "--no-progress"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            stdin=subprocess.DEVNULL,
        )
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not summary_path.is_file():
        return {
            "status": f"failed (exit {proc.returncode}): {_last_error(log_path.read_text(encoding='utf-8', errors='replace'))}",
            "train_wall_s": wall,
            "model": None,
        }
    s = json.loads(summary_path.read_text())
    if not keep_checkpoints:  # the arm is finished: final/ is what gets measured, the resume state is dead weight
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    (run_dir / "final.sha256").write_text(
        weights_digest(run_dir / "final") + "\n"
    )  # a restored final/ is checked on it
    notes = [n for n in (say, restored) if n]
    return {
        "status": f"ok ({'; '.join(notes)})" if notes else "ok",
        "train_wall_s": wall,
        "teacher_tokens": s.get("teacher_tokens"),
        "teacher_requests": s.get("teacher_requests"),
        "steps": s.get("steps"),
        "model": str(run_dir / "final"),
    }

"""``omniopd compare RECIPE.yaml [key=value ...]``: the methods side by side on the same budget.

The recipe's ``compare.variants`` lists named arms, each a method (``base`` = the untrained student,
``omniopd``, ``sft``, ``opd``, ``grpo``) plus dotted-key overrides. Every arm trains with the recipe's
student, teacher, prompts in the same order, steps, batch size and seed (overriding those per arm is
refused) in its own process (``python -m omniopd train``), one after another, so a crash is reported
in the table's status column and the other arms still run. Then every model that exists is measured
the same way, in this process:

- accuracy on every benchmark of ``compare.benchmarks`` (default: ``eval.data`` alone), the first
  ``eval.limit`` problems of each (None: all), greedy, ``eval.max_new_tokens`` (Wilson 95% interval; on
  the code benchmarks ``humaneval`` and ``mbppplus`` pass@1, graded in the sandbox), and per benchmark the
  paired per-problem difference to ``base`` (normal approximation for paired binary outcomes, see
  ``omniopd.measures``); the first benchmark's measures are also the top-level ones;
- continuous measures per benchmark with 95% intervals. Math: mean per-token log-likelihood of the
  reference solutions (calculator annotations removed, EOS included) under the student; the shares that
  state a final answer, that answer with ``####`` and stop, that loop, that hit the length limit, that
  are very short; mean length. Code: the log-likelihood of the canonical solutions (a ```python block,
  EOS included) after the evaluation prompt; MBPP+'s base-tests pass@1; the shares of valid Python, of
  answers defining the entry point, hitting the length limit; mean length. Once per arm: the reverse
  KL(student || teacher) per token on ``compare.kl_rollouts`` held-out ``eval.data`` rollouts sampled
  once from the base student with a fixed seed (the configured local/privileged teacher scores them with
  its own prompt; an API teacher or another tokenizer makes this column n/a, with the reason);
- an arm that cannot run by construction (white-box OPD with a teacher whose tokenizer differs from
  the student's) is not trained: its row says "not applicable" and why;
- teacher tokens and requests, training and evaluation wall time, learning rate and rollout
  temperature; departures (centred target, embedding phi, rollout temperature or top_p below 1) and
  ablations are named in every table;
- ``omniopd check-signal`` for every phi the omniopd arms use (with the recipe's teacher).

Writes ``comparison.md``, ``comparison.csv``, ``comparison.json`` and ``comparison.png`` (training
curves from each arm's ``metrics.jsonl`` and the final measures) into ``output_dir``; each arm's run is
in ``output_dir/runs/NAME`` (its ``checkpoints/`` removed once it finished, unless
``compare.keep_checkpoints``) and its log in ``output_dir/logs/NAME.log``; the graded answers in
``output_dir/eval/NAME_predictions.jsonl`` (``eval.data``) and ``output_dir/eval/NAME_BENCHMARK_predictions.jsonl``
(any other benchmark). A finished arm whose ``config.yaml`` matches is reused (``--rerun`` trains it
again); measurements are cached the same way, per benchmark (adding a benchmark measures only that one).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from omniopd.config import (
    WHITE_BOX_TEACHER_TYPES,
    RunConfig,
    apply_overrides,
    build_config,
    dump_config,
    read_recipe,
    set_dotted,
)
from omniopd.errors import ConfigError
from omniopd.methods import METHODS, Method, check_white_box_teacher, teacher_scoring_batch, teacher_tokenizer_differs
from omniopd.methods.opd import NOT_APPLICABLE as NOT_APPLICABLE_OPD  # noqa: F401 - the status of such a row

BASE = "base"  # the pseudo-method of an arm that is not trained: the student as it is

# settings every arm shares: an arm that changed them would not be compared on the same budget
SHARED_KEYS = ("student", "seed", "max_steps", "optim.prompts_per_step", "rollout.samples_per_prompt", "data", "eval",
               "output_dir", "method", "compare", "resume")

MEASURES = [  # (key, column title, kind)
    ("ref_loglik", "ref log-lik/token", "mean"),
    ("final_answer", "explicit final answer", "share"),
    ("answered_stopped", "#### then stop", "share"),
    ("loops", "loops", "share"),
    ("mean_length", "mean length (tokens)", "mean"),
    ("length_limit", "hit length limit", "share"),
    ("very_short", "≤ 10 tokens", "share"),
    ("reverse_kl", "reverse KL to teacher/token", "mean"),
]
CODE_MEASURES = [  # the same for the code benchmarks (base_accuracy: MBPP+ only)
    ("ref_loglik", "canonical log-lik/token", "mean"),
    ("base_accuracy", "MBPP base tests pass@1", "share"),
    ("valid_syntax", "valid Python", "share"),
    ("defines_entry_point", "defines entry point", "share"),
    ("length_limit", "hit length limit", "share"),
    ("mean_length", "mean length (tokens)", "mean"),
]


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
        raise ConfigError("compare.variants: empty; list the arms to compare, e.g. [{name: base, method: base}, {name: sft, method: sft}]")
    out = Path(cfg.output_dir)
    arm_data = {k: v for k, v in data.items() if k != "compare"}
    configs: dict[str, RunConfig | None] = {}
    for v in cfg.compare.variants:
        flat = _flatten(v.overrides)
        bad = [k for k in flat for s in SHARED_KEYS if _touches(k, s)]
        if bad:
            raise ConfigError(f"compare variant {v.name}: '{bad[0]}' must be the same for every arm (set it in the recipe, not in a variant)")
        if is_base(v):
            if v.overrides:
                raise ConfigError(f"compare variant {v.name}: method base (no training) takes no overrides")
            configs[v.name] = None
            continue
        fixed = {"method": v.method, "output_dir": str(out / "runs" / v.name), "eval.before": False, "eval.after": False, "resume": False}
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
    return method.departures(cfg) + method.labels(cfg)


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
    from omniopd.measures import share

    return share([extract_answer(r["output"]).rule in ("hash", "boxed") for r in records])


def _same_config(path: Path, cfg: RunConfig) -> bool:
    """The finished arm's config equals ``cfg`` (read through the current schema: a field added to omniopd
    since that run was trained counts at its default, so upgrading does not retrain every arm)."""
    import yaml

    from omniopd.config import normalized

    try:
        saved = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return False
    return normalized(saved) == cfg.model_dump(mode="json")


def arm_finished(cfg: RunConfig) -> bool:
    """Whether the arm's run finished with this config (its summary.json is written last)."""
    run_dir = Path(cfg.output_dir)
    return ((run_dir / "summary.json").is_file() and (run_dir / "config.yaml").is_file()
            and _same_config(run_dir / "config.yaml", cfg))


def train_arm(name: str, cfg: RunConfig, out: Path, *, rerun: bool, keep_checkpoints: bool = False) -> dict:
    run_dir = Path(cfg.output_dir)
    text = dump_config(cfg)
    summary_path = run_dir / "summary.json"
    if not rerun and arm_finished(cfg):
        # a finished arm; its final/ may be gone (a results folder committed without the weights): its
        # measures are then read from the cache, keyed by the run's summary, not by the model files
        s = json.loads(summary_path.read_text())
        kept = (run_dir / "final").is_dir()
        return {"status": "ok (reused)" if kept else "ok (reused results; final/ not kept)",
                "train_wall_s": s.get("wall_time_s"), "teacher_tokens": s.get("teacher_tokens"),
                "teacher_requests": s.get("teacher_requests"), "steps": s.get("steps"), "model": str(run_dir / "final")}
    cfg_path = out / "configs" / f"{name}.yaml"
    cfg_path.parent.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(text)
    log_path = out / "logs" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    src = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, *filter(None, [os.environ.get("PYTHONPATH")])]),
           "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    summary_path.unlink(missing_ok=True)
    t0 = time.perf_counter()
    with log_path.open("w", encoding="utf-8") as log:
        proc = subprocess.run([sys.executable, "-m", "omniopd", "train", str(cfg_path), "--overwrite", "--no-progress"],
                              stdout=log, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not summary_path.is_file():
        return {"status": f"failed (exit {proc.returncode}): {_last_error(log_path.read_text(encoding='utf-8', errors='replace'))}",
                "train_wall_s": wall, "model": None}
    s = json.loads(summary_path.read_text())
    if not keep_checkpoints:  # the arm is finished: final/ is what gets measured, the resume state is dead weight
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return {"status": "ok", "train_wall_s": wall, "teacher_tokens": s.get("teacher_tokens"),
            "teacher_requests": s.get("teacher_requests"), "steps": s.get("steps"), "model": str(run_dir / "final")}


# ------------------------------------------------------------------------------------------ benchmarks


def is_code_benchmark(bench: str) -> bool:
    from omniopd.evaluation.runner import CODE_BENCHMARKS

    return bench.lower() in CODE_BENCHMARKS


def _benchmark_labels(benchmarks: list[str]) -> dict[str, str]:
    """A short name per benchmark for column titles and file names: the name itself, or a jsonl path's
    file name without its suffixes (made unique)."""
    import re

    out: dict[str, str] = {}
    for b in benchmarks:
        label = b
        if "/" in b or b.endswith((".jsonl", ".json", ".gz")):
            label = Path(b).name.split(".")[0] or "data"
        label = re.sub(r"[^\w.+-]", "_", label)
        base, k = label, 2
        while label in out.values():
            label, k = f"{base}-{k}", k + 1
        out[b] = label
    return out


def _code_program(task) -> str:
    """The canonical program of a code task: HumanEval's prompt + canonical_solution, MBPP+'s canonical_solution."""
    program = task.prompt + task.canonical_solution if task.benchmark == "humaneval" else task.canonical_solution
    return program.strip("\n").rstrip()


def _examples(spec: str, limit: int | None):
    """``load_examples``, and for the code benchmarks their tasks as examples asked exactly as evaluation
    asks them (``runner.load_problems``), with the canonical program as the reference."""
    from omniopd.data import Example, load_examples

    if is_code_benchmark(spec):
        from omniopd.evaluation.code import load_code_tasks
        from omniopd.prompts import CODE_INSTRUCTION

        return [Example(t.task_id, t.prompt.strip(), "", reference=_code_program(t), instruction=CODE_INSTRUCTION)
                for t in load_code_tasks(spec.lower(), limit=limit)]
    return load_examples(spec, limit=limit)


def _reference_response(ex) -> str:
    """What the reference log-likelihood scores as the answer: a math solution without its calculator
    annotations, or code in a ```python block (the form the code instruction asks for)."""
    from omniopd.measures import clean_reference
    from omniopd.prompts import CODE_INSTRUCTION

    if ex.instruction == CODE_INSTRUCTION or getattr(ex, "tests", None) is not None:
        return f"```python\n{ex.reference.strip(chr(10)).rstrip()}\n```"
    return clean_reference(ex.reference)


def not_applicable(cfg: RunConfig | None) -> str | None:
    """Why an arm cannot run by construction (its row's status), or None; the method decides (white-box OPD:
    a teacher with another tokenizer, ``methods.opd.not_applicable``)."""
    return None if cfg is None else method_of(cfg).not_applicable(cfg)


# ------------------------------------------------------------------------------------------ measuring


class Judge:
    """Everything held fixed across arms: the benchmarks and their slices, the reference solutions, the
    KL rollouts, the teacher."""

    def __init__(self, cfg: RunConfig, out: Path, progress: bool):
        from omniopd.evaluation.runner import load_problems

        self.cfg, self.out, self.progress = cfg, out, progress
        self.benchmarks: list[str] = list(cfg.compare.benchmarks) or [cfg.eval.data]
        self.multi = len(self.benchmarks) > 1
        self.labels = _benchmark_labels(self.benchmarks)
        # loaded now: a missing benchmark or an unusable sandbox stops the run before any arm trains
        self.eval_counts = {b: len(load_problems(b, cfg.eval.limit)) for b in self.benchmarks}
        if any(is_code_benchmark(b) for b in self.benchmarks):
            from omniopd.evaluation.code import check_isolation

            check_isolation(cfg.eval.insecure_no_isolation)
        L = cfg.compare.loglik_limit or cfg.eval.limit
        self.loglik_examples = {b: [ex for ex in _examples(b, L) if ex.reference] for b in self.benchmarks}
        self.kl_rollouts: list[dict] = []
        self.kl_note: str | None = None
        self.spec_key = hashlib.sha256(json.dumps({
            # compare.benchmarks is not in it: the measures are cached per benchmark, the KL rollouts are on eval.data
            "eval": cfg.eval.model_dump(mode="json"),
            "compare": cfg.compare.model_dump(mode="json", exclude={"variants", "signal_steps", "benchmarks"}),
            # share_prefixes changes where the teacher's cache numbers come from, not its outputs
            "teacher": cfg.teacher.model_dump(mode="json", exclude={"share_prefixes"}), "student": cfg.student.model_dump(mode="json"),
            "rollout": cfg.rollout.model_dump(mode="json"), "seed": cfg.seed,
        }, sort_keys=True).encode()).hexdigest()[:16]

    def measures_for(self, bench: str) -> list[tuple[str, str, str]]:
        """The continuous-measure columns of ``bench`` (the reverse KL among them when there is one benchmark)."""
        if is_code_benchmark(bench):
            cols = [c for c in CODE_MEASURES if c[0] != "base_accuracy" or bench.lower() == "mbppplus"]
            return cols if self.multi else [*cols, MEASURES[-1]]
        return [c for c in MEASURES if c[0] != "reverse_kl"] if self.multi else MEASURES

    def records_path(self, name: str, bench: str) -> Path:
        if bench == self.cfg.eval.data:  # the path of the single-benchmark comparison
            return self.out / "eval" / f"{name}_predictions.jsonl"
        return self.out / "eval" / f"{name}_{self.labels[bench]}_predictions.jsonl"

    # -- the teacher for the reverse KL, and the held-out rollouts (sampled once from the base student)
    def _kl_unavailable(self) -> str | None:
        """Why there is no reverse KL (the teacher's tokenizer first: it rules the column out whatever the settings)."""
        try:
            differs = teacher_tokenizer_differs(self.cfg)
        except Exception:  # noqa: BLE001 - build_teacher reports it when the KL is measured
            differs = False
        if differs:
            return "n/a: the teacher's tokenizer differs from the student's"
        if self.cfg.compare.kl_rollouts == 0:
            return "n/a: compare.kl_rollouts=0"
        if self.cfg.teacher.type not in WHITE_BOX_TEACHER_TYPES:
            return f"n/a: teacher.type={self.cfg.teacher.type} gives no log-probabilities"
        return None

    def _teacher(self, base_model, tok):
        from omniopd.teachers import build_teacher

        note = self._kl_unavailable()
        if note:
            self.kl_note = note
            return None
        teacher = build_teacher(self.cfg, student=base_model, student_tokenizer=tok)
        try:
            check_white_box_teacher(teacher, tok, base_model)
        except ConfigError:
            self.kl_note = "n/a: the teacher's tokenizer differs from the student's"
            return None
        return teacher

    def prepare_kl_rollouts(self) -> None:
        import torch

        from omniopd.models import load_model
        from omniopd.prompts import student_messages
        from omniopd.rollout import chat_prompts, generate_texts

        n = self.cfg.compare.kl_rollouts
        note = self._kl_unavailable()
        if note:
            self.kl_note = note
            return
        path = self.out / "kl_rollouts.jsonl"
        if path.is_file():
            rows = [json.loads(line) for line in path.read_text().splitlines()]
            if rows and rows[0].get("spec") == self.spec_key:
                self.kl_rollouts = rows
                return
        examples = _examples(self.cfg.eval.data, limit=n)
        model, tok = load_model(self.cfg.student.name, self.cfg.student.dtype)
        r = self.cfg.rollout
        prompts = chat_prompts(tok, [student_messages(ex.question, ex.instruction) for ex in examples])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed + 4242)  # fixed: every arm is scored on the same rollouts
            responses, _ = generate_texts(model, tok, prompts, max_new_tokens=r.max_new_tokens, temperature=r.temperature,
                                          top_p=r.top_p, batch_size=r.batch_size)
        self.kl_rollouts = [{"spec": self.spec_key, "id": ex.id, "response_ids": resp} for ex, resp in zip(examples, responses, strict=True)]
        path.write_text("".join(json.dumps(row) + "\n" for row in self.kl_rollouts))
        del model

    # -- one model
    def cache_key(self, model_path: str) -> str:
        """A trained arm's measures are keyed by its run's summary.json (written once, at the end of its
        training), so they stay valid where final/ is not kept; the base model by its name."""
        summary = Path(model_path).parent / "summary.json"
        if Path(model_path).name == "final" and summary.is_file():
            run = hashlib.sha256(summary.read_bytes()).hexdigest()
            return hashlib.sha256(f"{self.spec_key}:run:{run}".encode()).hexdigest()[:16]
        return self.legacy_cache_key(model_path)

    def legacy_cache_key(self, model_path: str) -> str:
        """The key of measures cached before the summary-based key (by the model files' mtime)."""
        return hashlib.sha256(f"{self.spec_key}:{model_path}:{_mtime(model_path)}".encode()).hexdigest()[:16]

    def _from_cache(self, saved: dict, name: str) -> dict:
        """A cached measures dict in the current form: one written before there were several benchmarks
        (no "benchmarks") holds the measures of ``eval.data`` and the reverse KL."""
        m = saved
        if "benchmarks" in m:
            return m
        records_path = self.records_path(name, self.cfg.eval.data)
        if "final_answer" not in m and records_path.is_file():  # measured before this column existed
            m["final_answer"] = _final_answer_share([json.loads(x) for x in records_path.read_text().splitlines()])
        inner = {k: v for k, v in m.items() if k != "reverse_kl"}  # its eval_wall_s: everything, the KL included
        out = {"benchmarks": {self.cfg.eval.data: inner}, "kl_wall_s": 0.0}
        if "reverse_kl" in m:
            out["reverse_kl"] = m["reverse_kl"]
        return out

    def measure(self, name: str, model_path: str) -> dict:
        """The arm's measures: ``benchmarks`` (one dict per benchmark), the first benchmark's also at the
        top level, ``reverse_kl``, ``eval_wall_s`` (all of it), and ``errors`` for a benchmark that could not
        be measured (not cached: the next run tries it again)."""
        cache = self.out / "measures" / f"{name}.json"
        key = self.cache_key(model_path)
        m: dict[str, Any] = {"benchmarks": {}}
        if cache.is_file():
            saved = json.loads(cache.read_text())
            if saved.get("key") in (key, self.legacy_cache_key(model_path)):
                m = self._from_cache(saved["measures"], name)
        todo = [b for b in self.benchmarks if b not in m["benchmarks"]]
        errors: dict[str, str] = {}
        if todo or "reverse_kl" not in m:
            import torch

            from omniopd.models import load_model

            if Path(model_path).name == "final" and not Path(model_path).exists():
                missing = ", ".join(todo) or "the reverse KL"
                raise ConfigError(f"{name}: its final/ was not kept and {missing} is not measured yet: "
                                  "train the arm again (omniopd compare --rerun)")

            model, tok = load_model(model_path, self.cfg.student.dtype)
            for p in model.parameters():
                p.requires_grad_(False)
            for b in todo:
                try:
                    m["benchmarks"][b] = self._measure_benchmark(name, b, model, tok)
                except Exception as err:  # noqa: BLE001 - reported in the status column; the other benchmarks still run
                    errors[b] = f"{type(err).__name__}: {str(err)[:300]}"
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps({"key": key, "measures": m}))
            if "reverse_kl" not in m:
                t0 = time.perf_counter()
                with torch.no_grad():
                    m["reverse_kl"] = self._reverse_kl(model, tok)
                m["kl_wall_s"] = time.perf_counter() - t0
                cache.write_text(json.dumps({"key": key, "measures": m}))
            del model
        return self._view(m, errors)

    def _view(self, m: dict, errors: dict[str, str]) -> dict:
        benches = {b: m["benchmarks"][b] for b in self.benchmarks if b in m["benchmarks"]}
        out: dict[str, Any] = dict(benches.get(self.benchmarks[0]) or {})
        out["reverse_kl"] = m.get("reverse_kl")
        out["eval_wall_s"] = sum(x.get("eval_wall_s") or 0.0 for x in benches.values()) + (m.get("kl_wall_s") or 0.0)
        out["benchmarks"] = benches
        if errors:
            out["errors"] = errors
        return out

    def _measure_benchmark(self, name: str, bench: str, model, tok) -> dict:
        import torch

        from omniopd.evaluation.runner import evaluate_model
        from omniopd.measures import ratio_bootstrap, share

        t0 = time.perf_counter()
        e = self.cfg.eval
        records_path = self.records_path(name, bench)
        summary = evaluate_model(model, tok, bench, limit=e.limit, max_new_tokens=e.max_new_tokens, batch_size=e.batch_size,
                                 temperature=0.0, records_path=records_path, show_progress=self.progress,
                                 insecure_no_isolation=e.insecure_no_isolation)
        records = [json.loads(line) for line in records_path.read_text().splitlines()]
        B = self.cfg.compare.bootstrap_samples
        m: dict[str, Any] = {
            "accuracy": {"value": summary["accuracy"], "lo": summary["ci95"][0], "hi": summary["ci95"][1], "n": summary["n"]},
            "correct": [bool(r["correct"]) for r in records],
        }
        if is_code_benchmark(bench):
            from omniopd.evaluation.code import load_code_tasks
            from omniopd.measures import defines_entry_point, valid_python

            entry = {t.task_id: t.entry_point for t in load_code_tasks(bench.lower(), limit=e.limit)}
            if bench.lower() == "mbppplus":
                m["base_accuracy"] = share([bool(r.get("base_passed")) for r in records])
            m["valid_syntax"] = share([valid_python(r.get("code") or "") for r in records])
            m["defines_entry_point"] = share([defines_entry_point(r.get("code") or "", entry[r["id"]]) for r in records])
        else:
            from omniopd.measures import answered_and_stopped, is_short, loops

            m["final_answer"] = _final_answer_share(records)
            m["answered_stopped"] = share([answered_and_stopped(r["output"], r["finished"]) for r in records])
            m["loops"] = share([loops(r["output"]) for r in records])
            m["very_short"] = share([is_short(r["tokens"]) for r in records])
        m["length_limit"] = share([not r["finished"] for r in records])
        m["mean_length"] = ratio_bootstrap([r["tokens"] for r in records], [1.0] * len(records), samples=B)
        with torch.no_grad():
            m["ref_loglik"] = self._ref_loglik(model, tok, self.loglik_examples[bench])
        m["eval_wall_s"] = time.perf_counter() - t0
        return m

    def _ref_loglik(self, model, tok, exs) -> dict:
        """Mean log-probability per token of each example's reference answer (EOS included) after the
        student's prompt (the one evaluation sends); bootstrap over examples."""
        from omniopd.alignment import response_hidden
        from omniopd.core import token_stats
        from omniopd.measures import ratio_bootstrap
        from omniopd.prompts import student_messages
        from omniopd.rollout import chat_prompts, pack

        sums, counts = [], []
        mb = max(1, min(8, self.cfg.eval.batch_size))
        for i in range(0, len(exs), mb):
            part = exs[i : i + mb]
            prompts = chat_prompts(tok, [student_messages(ex.question, ex.instruction) for ex in part])
            responses = [tok.encode(_reference_response(ex), add_special_tokens=False) + [tok.eos_token_id] for ex in part]
            batch = pack(tok, prompts, responses, tok.pad_token_id)
            hidden, head = response_hidden(model, batch)
            logp = token_stats(hidden, head, batch.response_ids, slice_size=self.cfg.loss.slice_size).logprobs
            mask = batch.response_mask
            sums += logp.masked_fill(~mask, 0.0).sum(1).tolist()
            counts += mask.sum(1).float().tolist()
        return ratio_bootstrap(sums, counts, samples=self.cfg.compare.bootstrap_samples)

    def _reverse_kl(self, model, tok) -> dict:
        from omniopd.alignment import response_hidden
        from omniopd.core.baselines import reverse_kl_sliced
        from omniopd.measures import ratio_bootstrap
        from omniopd.models import load_model
        from omniopd.prompts import student_messages
        from omniopd.rollout import chat_prompts, pack

        if not self.kl_rollouts:
            return {"value": None, "lo": None, "hi": None, "n": 0, "note": self.kl_note or "n/a"}
        base_model, base_tok = load_model(self.cfg.student.name, self.cfg.student.dtype)
        teacher = self._teacher(base_model, base_tok)
        if teacher is None:
            return {"value": None, "lo": None, "hi": None, "n": 0, "note": self.kl_note}
        by_id = {ex.id: ex for ex in _examples(self.cfg.eval.data, limit=len(self.kl_rollouts))}
        sums, counts = [], []
        mb = max(1, min(8, self.cfg.eval.batch_size))
        for i in range(0, len(self.kl_rollouts), mb):
            part = self.kl_rollouts[i : i + mb]
            exs = [by_id[r["id"]] for r in part]
            responses = [r["response_ids"] or [tok.eos_token_id] for r in part]
            sbatch = pack(tok, chat_prompts(tok, [student_messages(ex.question, ex.instruction) for ex in exs]), responses, tok.pad_token_id)
            tbatch = teacher_scoring_batch(teacher, exs, responses)
            h, head = response_hidden(model, sbatch)
            th, thead = response_hidden(teacher.model, tbatch)
            kl = reverse_kl_sliced(h, head, th, thead, slice_size=self.cfg.loss.slice_size)
            mask = sbatch.response_mask
            sums += kl.masked_fill(~mask, 0.0).sum(1).tolist()
            counts += mask.sum(1).float().tolist()
        teacher.close()
        out = ratio_bootstrap(sums, counts, samples=self.cfg.compare.bootstrap_samples)
        out["note"] = f"KL(student ‖ {teacher.name}) per token on {len(self.kl_rollouts)} base-student rollouts"
        return out


def _mtime(path: str) -> float:
    p = Path(path)
    files = list(p.glob("*.safetensors")) if p.is_dir() else []
    return max((f.stat().st_mtime for f in files), default=0.0)


# ------------------------------------------------------------------------------------------ tables


def _fmt(m: dict | None, digits: int = 3, pct: bool = False) -> str:
    if not m or m.get("value") is None:
        return "n/a"
    k = 100.0 if pct else 1.0
    unit = "%" if pct else ""
    d = 1 if pct else digits
    v = f"{k * m['value']:.{d}f}{unit}"
    if m.get("lo") is None:
        return v
    return f"{v} [{k * m['lo']:.{d}f}, {k * m['hi']:.{d}f}]"


def _bench_value(r: dict, bench: str, key: str) -> dict | None:
    """One measure of one arm: per benchmark, or the arm's reverse KL (one for all benchmarks)."""
    m = r.get("measures") or {}
    if key == "reverse_kl":
        return m.get("reverse_kl")
    return ((m.get("benchmarks") or {}).get(bench) or {}).get(key)


def _csv_rows(rows: list[dict], judge: Judge) -> tuple[list[str], list[list]]:
    """One row per arm. One benchmark: the columns as they always were; several: every per-benchmark
    column prefixed with the benchmark's name (``humaneval_accuracy``), the reverse KL once."""
    cols = ["variant", "method", "status", "departures", "changes", "teacher", "lr", "rollout_temperature", "steps"]
    for b in judge.benchmarks:
        p = f"{judge.labels[b]}_" if judge.multi else ""
        cols += [f"{p}accuracy", f"{p}accuracy_lo", f"{p}accuracy_hi", f"{p}n_problems", f"{p}diff_vs_base", f"{p}diff_lo", f"{p}diff_hi"]
        for key, _, _ in judge.measures_for(b):
            cols += [f"{p}{key}", f"{p}{key}_lo", f"{p}{key}_hi"]
    if judge.multi:
        cols += ["reverse_kl", "reverse_kl_lo", "reverse_kl_hi"]
    cols += ["teacher_tokens", "teacher_requests", "train_wall_s", "eval_wall_s"]
    out = []
    for r in rows:
        m = r.get("measures") or {}
        line = [r["name"], r["method"], r["status"], "; ".join(r["departures"]), r["changes"], r["teacher"], r["lr"],
                r["rollout_temperature"], r["steps"]]
        for b in judge.benchmarks:
            acc, diff = _bench_value(r, b, "accuracy") or {}, (r.get("diffs") or {}).get(b) or {}
            line += [acc.get("value"), acc.get("lo"), acc.get("hi"), acc.get("n"), diff.get("value"), diff.get("lo"), diff.get("hi")]
            for key, _, _ in judge.measures_for(b):
                x = _bench_value(r, b, key) or {}
                line += [x.get("value"), x.get("lo"), x.get("hi")]
        if judge.multi:
            x = m.get("reverse_kl") or {}
            line += [x.get("value"), x.get("lo"), x.get("hi")]
        line += [r.get("teacher_tokens"), r.get("teacher_requests"), r.get("train_wall_s"), m.get("eval_wall_s")]
        out.append(line)
    return cols, out


def _not_run(status: str) -> bool:
    return status.startswith(("not applicable", "not run"))


def write_tables(out: Path, cfg: RunConfig, rows: list[dict], signal: dict | None, signal_error: str | None, judge: Judge) -> None:
    cols, data = _csv_rows(rows, judge)
    with (out / "comparison.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(cols)
        w.writerows(data)
    (out / "comparison.json").write_text(json.dumps({"benchmarks": judge.benchmarks, "rows": rows, "signal_check": signal,
                                                     "signal_error": signal_error}, indent=2, default=str))

    def num(x, fmt="{:,.0f}"):
        return "—" if x is None else fmt.format(x)

    def cell(text: str) -> str:  # an error message must not break the table
        return " ".join(str(text).split()).replace("|", "\\|")

    e = cfg.eval
    benches, multi = judge.benchmarks, judge.multi
    prefix = {b: f"{judge.labels[b]} " if multi else "" for b in benches}
    math = [b for b in benches if not is_code_benchmark(b)]
    code = [b for b in benches if is_code_benchmark(b)]
    if multi:
        where = (f"Evaluation, greedy, at most {e.max_new_tokens} new tokens, on "
                 + "; ".join(f"the first {judge.eval_counts[b]} problems of `{b}`" for b in benches) + ".")
    else:
        where = f"Evaluation: first {judge.eval_counts[benches[0]]} problems of `{benches[0]}`, greedy, at most {e.max_new_tokens} new tokens."
    L = [f"# Comparison: {cfg.output_dir}", ""]
    L.append(f"Student `{cfg.student.name}`, teacher `{cfg.teacher.type}` ({cfg.teacher.model or 'the student model'}), "
             f"{cfg.max_steps} steps × {cfg.optim.prompts_per_step} prompts × {cfg.rollout.samples_per_prompt} samples, seed {cfg.seed}, "
             f"training data `{cfg.data.train}` in the same order for every arm. {where}")
    acc_cols = " | ".join(f"{prefix[b]}accuracy [95% CI] | {prefix[b]}Δ vs base, points [95% CI]" for b in benches)
    L += ["", "## Accuracy and cost", "",
          f"| variant | method | status | departures / ablations | lr | rollout T | steps | {acc_cols} "
          "| teacher tokens | teacher requests | train wall | eval wall |",
          "|---" * (11 + 2 * len(benches)) + "|"]
    for r in rows:
        m = r.get("measures") or {}
        accs = " | ".join(f"{_fmt(_bench_value(r, b, 'accuracy'), pct=True)} | "
                          f"{_fmt((r.get('diffs') or {}).get(b), pct=True) if not is_base(r) else '—'}" for b in benches)
        L.append(f"| {r['name']} | {r['method']} | {cell(r['status'])} | {'; '.join(r['departures']) or '—'} | {num(r['lr'], '{:g}')} | "
                 f"{num(r['rollout_temperature'], '{:g}')} | {num(r['steps'], '{:d}')} | {accs} | {num(r.get('teacher_tokens'))} | "
                 f"{num(r.get('teacher_requests'))} | {num(r.get('train_wall_s'), '{:.0f} s')} | {num(m.get('eval_wall_s'), '{:.0f} s')} |")
    for b in benches:
        ms = judge.measures_for(b)
        L += ["", f"## Continuous measures on `{b}` (95% intervals)" if multi else "## Continuous measures (95% intervals)", "",
              "| variant | " + " | ".join(title for _, title, _ in ms) + " |",
              "|---" * (len(ms) + 1) + "|"]
        for r in rows:
            cells = [_fmt(_bench_value(r, b, key), pct=(kind == "share")) for key, _, kind in ms]
            L.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    if multi:
        L += ["", "## Reverse KL to the teacher (95% intervals)", "", "| variant | reverse KL to teacher/token |", "|---|---|"]
        L += [f"| {r['name']} | {_fmt((r.get('measures') or {}).get('reverse_kl'))} |" for r in rows]
    from omniopd import measures as M

    kl_notes = [((r.get("measures") or {}).get("reverse_kl") or {}).get("note") for r in rows]
    kl_note = next((n for n in kl_notes if n), None)
    L += ["", "## How to read this", "",
          "- **accuracy**: Wilson 95% interval. **Δ vs base**: paired per problem, d_i = correct_i(arm) − correct_i(base); "
          "mean ± 1.96·sd(d)/√n (normal approximation for paired differences of binary outcomes)."]
    if math:
        L += ["- **ref log-lik/token**: mean log-probability per token of the reference solutions of the "
              + ", of the ".join(f"first {len(judge.loglik_examples[b])} `{b}` problems" for b in math)
              + " (calculator annotations `<<…>>` removed, EOS included) after the student's prompt; percentile bootstrap over problems.",
              "- **explicit final answer**: the answer states its final answer as `#### x` or `\\boxed{x}` (right or wrong); answers graded "
              "only through their last number do not count.",
              "- **#### then stop**: the answer ended with EOS before the length limit and its last non-empty line holds `####` and an answer.",
              f"- **loops**: `####` {M.LOOP_MARKER_COUNT}+ times, or the last {M.LOOP_WINDOW_CHARS} characters (whitespace collapsed, "
              f"digit runs → 0) are periodic with period ≤ {M.LOOP_MAX_PERIOD} (three or more copies of one string fill the tail).",
              f"- **hit length limit**: no EOS within {e.max_new_tokens} tokens. **≤ 10 tokens**: answers of at most {M.SHORT_TOKENS} tokens. "
              "Shares: Wilson intervals; mean length: bootstrap over problems."]
    if code:
        L += ["- **accuracy on " + ", ".join(f"`{b}`" for b in code) + "**: pass@1 of the greedy answer, its code graded in the isolated "
              "sandbox (HumanEval: the task's official `check`; MBPP+: the EvalPlus base and plus inputs)."]
        if any(b.lower() == "mbppplus" for b in code):
            L.append("- **MBPP base tests pass@1**: the same answers on MBPP+'s original MBPP inputs only (the MBPP base score); Wilson interval.")
        L += ["- **canonical log-lik/token**: mean log-probability per token of the canonical solutions of the "
              + ", of the ".join(f"first {len(judge.loglik_examples[b])} `{b}` problems" for b in code)
              + " (HumanEval: prompt + canonical solution; MBPP+: the canonical solution), written as one fenced python block and "
              "followed by EOS, after the student's evaluation prompt (the task and the code instruction); percentile bootstrap over problems.",
              "- **valid Python**: the code extracted from the answer is non-empty and parses on its own (`ast.parse`); an answer that only "
              "continues the HumanEval prompt's body, without its `def` line, does not. **defines entry point**: that code defines the "
              "task's function at top level (`def name(`; for code that does not parse, a `def name(` line).",
              f"- **hit length limit** (code): no EOS within {e.max_new_tokens} tokens. **mean length**: generated tokens, bootstrap over "
              "problems. Shares: Wilson intervals."]
    L += [f"- **reverse KL to teacher**: {kl_note or 'n/a'}; token-weighted mean, bootstrap over rollouts. "
          f"The rollouts were sampled once from the base student (temperature {cfg.rollout.temperature:g}, seed {cfg.seed}+4242) on the first "
          f"{cfg.compare.kl_rollouts} `{e.data}` problems.",
          "- **departures** (off by default in the paper's method, labelled wherever they are used): centred target "
          "(chunk weight π̂ − mean π̂ of the step, can push chunks down), embedding φ (all-MiniLM-L6-v2 cosine clipped to [0, 1]), "
          "adaptive N (teacher asked in rounds; a chunk stops before N once its 95% posterior interval is narrow enough), "
          "rollout temperature or top_p below 1. **ablations**: the paper's switches (no KL anchor, α = 0, other anchor selectors).",
          "- teacher tokens: OmniOPD prompt + continuation tokens of the audits; SFT the tokens of the teacher-written "
          "solutions used (counted even when read from the cache); OPD the tokens of the teacher's forward passes; GRPO none."]
    if any(_not_run(r["status"]) for r in rows):
        L.append("- **not applicable**: an arm that cannot run by construction is neither trained nor measured. White-box OPD reads "
                 "the teacher's log-probabilities over the student's own tokens, which a teacher with another tokenizer does not have; "
                 "OmniOPD and SFT work with such a teacher.")
    failed = [r for r in rows if not r["status"].startswith("ok") and not _not_run(r["status"])]
    if failed:
        L += ["", "## Failed arms", ""] + [f"- **{r['name']}**: {cell(r['status'])} (log: `logs/{r['name']}.log`)" for r in failed]
    L += ["", "## Signal check (does k_sem carry teacher information?)", ""]
    if signal:
        from omniopd.signal_check import format_signal

        L += ["```", format_signal(signal), "```"]
    else:
        L.append(signal_error or "not run (no omniopd arm, or compare.signal_steps=0)")
    if (out / "comparison.png").is_file():
        L += ["", "![training curves and final measures](comparison.png)"]
    (out / "comparison.md").write_text("\n".join(L) + "\n", encoding="utf-8")


def _final_panels(judge: Judge | None) -> list[tuple[str | None, str, str]]:
    """(benchmark, measure, title) of the final-measure panels: today's six for one math benchmark; the
    accuracy of every benchmark first when there are several."""
    if judge is None or (not judge.multi and not is_code_benchmark(judge.benchmarks[0])):
        b = judge.benchmarks[0] if judge else None
        return [(b, "accuracy", "accuracy"), (b, "ref_loglik", "ref log-lik/token"), (b, "answered_stopped", "#### then stop"),
                (b, "loops", "loops"), (b, "mean_length", "mean length (tokens)"), (b, "reverse_kl", "reverse KL to teacher/token")]
    if not judge.multi:
        b = judge.benchmarks[0]
        return [(b, "accuracy", "pass@1"), (b, "ref_loglik", "canonical log-lik/token"), (b, "valid_syntax", "valid Python"),
                (b, "defines_entry_point", "defines entry point"), (b, "mean_length", "mean length (tokens)"),
                (b, "reverse_kl", "reverse KL to teacher/token")]
    out: list[tuple[str | None, str, str]] = [(b, "accuracy", f"{judge.labels[b]} accuracy") for b in judge.benchmarks]
    out += [(b, "ref_loglik", f"{judge.labels[b]} {'canonical' if is_code_benchmark(b) else 'ref'} log-lik/token") for b in judge.benchmarks]
    return [*out, (None, "reverse_kl", "reverse KL to teacher/token")]


def write_plot(out: Path, rows: list[dict], judge: Judge | None = None) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'omniopd[report]'): no comparison.png"
    curves = [("rollout/mean_length", "rollout mean length (tokens)"), ("rollout/truncated_frac", "rollouts hitting the limit"),
              ("loss/total", "loss/total (each method's own loss)"), ("teacher/tokens_total", "teacher tokens (cumulative)")]
    finals = _final_panels(judge)
    color = {r["name"]: f"C{i % 10}" for i, r in enumerate(rows)}  # one colour per arm in every panel
    nrows = 1 + max(2, -(-len(finals) // 4))
    fig, axes = plt.subplots(nrows, 4, figsize=(17, 11 * nrows / 3))
    for ax, (key, title) in zip(axes[0], curves, strict=True):
        for r in rows:
            path = Path(r.get("run_dir") or "") / "metrics.jsonl"
            if not r.get("run_dir") or not path.is_file():
                continue
            pts = []
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    break
                if key in row:
                    pts.append((row["step"], row[key]))
            if pts:
                ax.plot(*zip(*pts), marker=".", color=color[r["name"]], label=r["name"])
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("training step", fontsize=8)
    names = [r["name"] for r in rows]
    panels = [ax for row_axes in axes[1:] for ax in row_axes]
    for ax, (bench, key, title) in zip(panels, finals, strict=False):
        for i, r in enumerate(rows):
            m = (_bench_value(r, bench, key) if bench is not None else (r.get("measures") or {}).get(key)) or {}
            if m.get("value") is None:
                continue
            lo = m["value"] if m.get("lo") is None else m["lo"]
            hi = m["value"] if m.get("hi") is None else m["hi"]
            ax.errorbar([i], [m["value"]], yerr=[[m["value"] - lo], [hi - m["value"]]], fmt="o", capsize=3, color=color[r["name"]])
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=40, ha="right", fontsize=7)
        ax.set_title(f"{title} after {max((r.get('steps') or 0) for r in rows)} steps (95% CI)", fontsize=9)
    for ax in panels[len(finals):]:
        ax.axis("off")
    handles = [plt.Line2D([], [], color=color[n], marker="o", label=n) for n in names]
    fig.legend(handles=handles, loc="lower right", fontsize=9, title="arm")
    fig.tight_layout()
    fig.savefig(out / "comparison.png", dpi=90)
    plt.close(fig)
    return None


# ------------------------------------------------------------------------------------------ the run


def run_compare(recipe: str | Path, overrides: list[str] | None = None, *, rerun: bool = False, progress: bool = True,
                only: list[str] | None = None) -> dict:
    """Train and measure every arm (``only``: train just these, and the base model; the other arms are
    reused when finished and otherwise listed as not run, so the tables stay whole)."""
    cfg, configs = variant_configs(recipe, list(overrides or []))
    unknown = sorted(set(only or []) - {v.name for v in cfg.compare.variants})
    if unknown:
        raise ConfigError(f"--only: no variant named {unknown[0]!r} in compare.variants "
                          f"({', '.join(v.name for v in cfg.compare.variants)})")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare_config.yaml").write_text(dump_config(cfg))
    t_all = time.perf_counter()

    def say(msg: str) -> None:
        if progress:
            print(f"omniopd compare: {msg}", flush=True)

    judge = Judge(cfg, out, progress)
    judge.prepare_kl_rollouts()

    # the phi of every arm whose teacher writes text compared by phi (the omniopd arms)
    phis = list(dict.fromkeys(c.audit.phi for c in configs.values() if c is not None and method_of(c).teacher_role(c) == "text"))
    signal, signal_error = None, None
    if phis and cfg.compare.signal_steps > 0:
        say(f"signal check for phi {', '.join(phis)} ({cfg.compare.signal_steps} batches)")
        sig_path = out / "signal_check.json"
        # the signal check always asks for exactly N continuations: the adaptive-N settings do not enter it
        audit_key = cfg.audit.model_dump(mode="json", exclude={"adaptive_n", "adaptive_round", "adaptive_width"})
        sig_spec = [judge.spec_key, cfg.compare.signal_steps, phis, audit_key,
                    cfg.data.model_dump(mode="json"), cfg.optim.prompts_per_step]
        sig_key = hashlib.sha256(json.dumps(sig_spec, sort_keys=True).encode()).hexdigest()[:16]
        try:
            from omniopd.signal_check import check_signal

            saved = json.loads(sig_path.read_text()) if sig_path.is_file() else {}
            if saved.get("key") == sig_key:
                signal = saved["report"]
            else:
                signal = check_signal(cfg, steps=cfg.compare.signal_steps, phis=phis)
                sig_path.write_text(json.dumps({"key": sig_key, "report": signal}, indent=2))
        except Exception as err:  # noqa: BLE001 - a failed check is reported in the table, the arms still run
            signal_error = f"signal check failed: {type(err).__name__}: {str(err)[:300]}"

    rows: list[dict] = []
    base_measures: dict | None = None
    for i, v in enumerate(cfg.compare.variants, 1):
        vcfg = configs[v.name]  # None: base
        method = method_of(vcfg) if vcfg else None
        row: dict[str, Any] = {
            "name": v.name, "method": v.method, "departures": departures(vcfg),
            "changes": ", ".join(f"{k}={val}" for k, val in v.overrides.items()),
            "teacher": (f"{vcfg.teacher.type}:{vcfg.teacher.model or 'student'}" if method and method.uses_teacher(vcfg) else "—"),
            "lr": vcfg.optim.lr if vcfg else None,
            "rollout_temperature": vcfg.rollout.temperature if method and method.on_policy else None,
            "steps": 0 if vcfg is None else None, "teacher_tokens": 0 if vcfg is None else None,
            "teacher_requests": 0 if vcfg is None else None, "train_wall_s": 0.0 if vcfg is None else None,
            "run_dir": vcfg.output_dir if vcfg else None, "measures": None, "diff": None, "diffs": None,
        }
        why_not = not_applicable(vcfg)
        if only and vcfg is not None and not why_not and v.name not in only and not arm_finished(vcfg):
            row["status"], row["run_dir"], model_path = "not run (--only)", None, None
        elif vcfg is None:
            row["status"], model_path = "ok (no training)", cfg.student.name
        elif why_not:
            row["status"], row["run_dir"], model_path = why_not, None, None
            say(f"[{i}/{len(cfg.compare.variants)}] {v.name}: {why_not}")
        else:
            say(f"[{i}/{len(cfg.compare.variants)}] {v.name}: training ({v.method}, {cfg.max_steps} steps)")
            res = train_arm(v.name, vcfg, out, rerun=rerun, keep_checkpoints=cfg.compare.keep_checkpoints)
            model_path = res.pop("model")
            row.update(res)
            say(f"[{i}/{len(cfg.compare.variants)}] {v.name}: {row['status']}")
        if model_path is not None:
            say(f"[{i}/{len(cfg.compare.variants)}] {v.name}: measuring")
            try:
                row["measures"] = judge.measure(v.name, model_path)
            except Exception as err:  # noqa: BLE001 - reported in the status column; the other arms still run
                row["status"] += f"; measuring failed: {type(err).__name__}: {str(err)[:300]}"
            for bench, err in ((row["measures"] or {}).get("errors") or {}).items():
                row["status"] += f"; measuring {bench} failed: {err}"
        rows.append(row)
        if is_base(v) and row["measures"]:
            base_measures = row["measures"]
        _diffs(rows, base_measures, judge.benchmarks[0])
        write_tables(out, cfg, rows, signal, signal_error, judge)  # after every arm: a killed run keeps what it had
    plot_note = write_plot(out, rows, judge)
    write_tables(out, cfg, rows, signal, signal_error, judge)
    result = {"output_dir": str(out), "benchmarks": judge.benchmarks, "rows": rows, "signal_check": signal, "wall_time_s": time.perf_counter() - t_all,
              "comparison_md": str(out / "comparison.md"), "comparison_csv": str(out / "comparison.csv"), "plot_note": plot_note}
    return result


def _diffs(rows: list[dict], base_measures: dict | None, first: str | None = None) -> None:
    """Per benchmark, each arm's paired difference to the base arm (``diffs``); ``diff``: the first benchmark's."""
    from omniopd.measures import paired_difference

    if not base_measures:
        return
    base = base_measures.get("benchmarks") or {}
    for r in rows:
        m = r.get("measures")
        if not m or is_base(r):
            continue
        diffs = {}
        for bench, x in (m.get("benchmarks") or {}).items():
            b = base.get(bench)
            if b is not None and len(b["correct"]) == len(x["correct"]):
                diffs[bench] = paired_difference(x["correct"], b["correct"])
        r["diffs"], r["diff"] = diffs, diffs.get(first if first is not None else next(iter(base), ""))


def format_compare(result: dict) -> str:
    lines = ["== omniopd compare =="]
    benches = result.get("benchmarks") or []
    for r in result["rows"]:
        m = r.get("measures") or {}
        if len(benches) > 1:
            labels = _benchmark_labels(benches)
            acc = ", ".join(f"{labels[b]} {_fmt(_bench_value(r, b, 'accuracy'), pct=True)}" for b in benches)
        else:
            acc = _fmt(m.get("accuracy"), pct=True)
        lines.append(f"{r['name']:<22} {r['status'][:60]:<60} accuracy {acc}")
    lines.append(f"tables: {result['comparison_md']}, {result['comparison_csv']}   ({result['wall_time_s'] / 60:.1f} min)")
    if result.get("plot_note"):
        lines.append(result["plot_note"])
    return "\n".join(lines)

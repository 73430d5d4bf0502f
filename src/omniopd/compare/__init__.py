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
  ``omniopd.evaluation.measures``); the first benchmark's measures are also the top-level ones;
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
again); an arm stopped part-way (a killed session) continues from its newest checkpoint written under the
same config (``checkpoint.every_steps``); measurements are cached the same way, per benchmark (adding a
benchmark measures only that one).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from omniopd.compare.arms import (  # noqa: F401 - the public names of omniopd.compare
    BASE,
    SHARED_KEYS,
    _final_answer_share,
    _same_config,
    arm_finished,
    departures,
    is_base,
    method_of,
    train_arm,
    variant_configs,
)
from omniopd.compare.judge import CODE_MEASURES, MEASURES, Judge, _benchmark_labels, is_code_benchmark, not_applicable  # noqa: F401
from omniopd.compare.tables import _not_run, format_compare, write_plot, write_tables  # noqa: F401
from omniopd.config import dump_config
from omniopd.errors import ConfigError
from omniopd.methods import teacher_tokenizer_differs  # noqa: F401 - re-exported
from omniopd.methods.opd import NOT_APPLICABLE as NOT_APPLICABLE_OPD  # noqa: F401 - the status of such a row

# ------------------------------------------------------------------------------------------ the run


def run_compare(
    recipe: str | Path,
    overrides: list[str] | None = None,
    *,
    rerun: bool = False,
    progress: bool = True,
    only: list[str] | None = None,
) -> dict:
    """Train and measure every arm (``only``: train just these, and the base model; the other arms are
    reused when finished and otherwise listed as not run, so the tables stay whole)."""
    cfg, configs = variant_configs(recipe, list(overrides or []))
    unknown = sorted(set(only or []) - {v.name for v in cfg.compare.variants})
    if unknown:
        raise ConfigError(
            f"--only: no variant named {unknown[0]!r} in compare.variants "
            f"({', '.join(v.name for v in cfg.compare.variants)})"
        )
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
    phis = list(
        dict.fromkeys(c.audit.phi for c in configs.values() if c is not None and method_of(c).teacher_role(c) == "text")
    )
    signal, signal_error = None, None
    if phis and cfg.compare.signal_steps > 0:
        say(f"signal check for phi {', '.join(phis)} ({cfg.compare.signal_steps} batches)")
        sig_path = out / "signal_check.json"
        # the signal check always asks for exactly N continuations: the adaptive-N settings do not enter it
        audit_key = cfg.audit.model_dump(mode="json", exclude={"adaptive_n", "adaptive_round", "adaptive_width"})
        sig_spec = [
            judge.spec_key,
            cfg.compare.signal_steps,
            phis,
            audit_key,
            cfg.data.model_dump(mode="json"),
            cfg.optim.prompts_per_step,
        ]
        sig_key = hashlib.sha256(json.dumps(sig_spec, sort_keys=True).encode()).hexdigest()[:16]
        try:
            from omniopd.diagnostics.signal_check import check_signal

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
            "name": v.name,
            "method": v.method,
            "departures": departures(vcfg),
            "changes": ", ".join(f"{k}={val}" for k, val in v.overrides.items()),
            "teacher": (
                f"{vcfg.teacher.type}:{vcfg.teacher.model or 'student'}"
                if vcfg and method and method.uses_teacher(vcfg)
                else "—"
            ),
            "lr": vcfg.optim.lr if vcfg else None,
            "rollout_temperature": vcfg.rollout.temperature if vcfg and method and method.on_policy else None,
            "steps": 0 if vcfg is None else None,
            "teacher_tokens": 0 if vcfg is None else None,
            "teacher_requests": 0 if vcfg is None else None,
            "train_wall_s": 0.0 if vcfg is None else None,
            "run_dir": vcfg.output_dir if vcfg else None,
            "measures": None,
            "diff": None,
            "diffs": None,
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
            for bench, why in ((row["measures"] or {}).get("errors") or {}).items():
                row["status"] += f"; measuring {bench} failed: {why}"
        rows.append(row)
        if is_base(v) and row["measures"]:
            base_measures = row["measures"]
        _diffs(rows, base_measures, judge.benchmarks[0])
        _control_diffs(rows, cfg.compare.control)
        write_tables(out, cfg, rows, signal, signal_error, judge)  # after every arm: a killed run keeps what it had
    plot_note = write_plot(out, rows, judge)
    write_tables(out, cfg, rows, signal, signal_error, judge)
    result = {
        "output_dir": str(out),
        "benchmarks": judge.benchmarks,
        "rows": rows,
        "signal_check": signal,
        "wall_time_s": time.perf_counter() - t_all,
        "comparison_md": str(out / "comparison.md"),
        "comparison_csv": str(out / "comparison.csv"),
        "plot_note": plot_note,
    }
    return result


def _control_diffs(rows: list[dict], control: str | None) -> None:
    """Per benchmark, each arm's paired difference to the ``control`` arm (``diffs_control``), once it is measured."""
    from omniopd.evaluation.measures import paired_difference

    ref = next((r for r in rows if r["name"] == control), None)
    ref_b = ((ref or {}).get("measures") or {}).get("benchmarks") or {}
    for r in rows:
        m = (r.get("measures") or {}).get("benchmarks") or {}
        if r["name"] == control or not ref_b:
            continue
        r["diffs_control"] = {
            b: paired_difference(x["correct"], ref_b[b]["correct"])
            for b, x in m.items()
            if b in ref_b and len(ref_b[b]["correct"]) == len(x["correct"])
        }


def _diffs(rows: list[dict], base_measures: dict | None, first: str | None = None) -> None:
    """Per benchmark, each arm's paired difference to the base arm (``diffs``); ``diff``: the first benchmark's."""
    from omniopd.evaluation.measures import paired_difference

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

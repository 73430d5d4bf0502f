"""Learning-rate sweep for a comparison's on-policy stage, scored on a validation split it never trains on.

Each learning rate trains the recipe's method for ``--steps`` steps from ``--student`` (a first stage's final/,
which is also the KL anchor's reference), then scores the final weights on ``--data`` (default MBPP's validation
split: its own unit tests, greedy, the recipe's evaluation engine). The starting model is scored too (lr 0).

    python scripts/lr_sweep.py recipes/compare-code-scale-cpu.yaml \\
        --student results/compare-code-scale-cpu/runs/sft/final --base-gguf smollm2-135m-instruct \\
        --lr 1e-5 3e-5 1e-4 --steps 4 --output results/compare-code-scale-cpu/lr_sweep.json

Runs go to ``--runs`` (default runs/lr-sweep/, not committed); the JSON report is written after every run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def _train(recipe: str, out: Path, lr: float, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable, "-m", "omniopd", "train", recipe,
        f"method={args.method}", f"student.name={args.student}", f"optim.lr={lr}", f"max_steps={args.steps}",
        "eval.before=false", "eval.after=true", f"eval.data={args.data}", "eval.limit=null",
        "checkpoint.every_steps=0", f"output_dir={out}", *args.overrides, "--overwrite", "--no-progress",
    ]  # fmt: skip
    if args.base_gguf:
        cmd.insert(5, f"student.base_gguf={args.base_gguf}")
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    with (out.parent / f"{out.name}.log").open("w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        return {"lr": lr, "status": f"failed (exit {proc.returncode}): see {out.parent / (out.name + '.log')}"}
    s = json.loads((out / "summary.json").read_text())
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {
        "lr": lr,
        "status": "ok",
        "steps": s["steps"],
        "validation": s["accuracy_after"],
        "train_wall_s": time.perf_counter() - t0,
        "teacher_tokens": s["teacher_tokens"],
        "last_step": metrics[-1] if metrics else {},
    }


def _score_start(args: argparse.Namespace, runs: Path, cfg) -> dict:
    out = runs / "start.json"
    cmd = [
        sys.executable, "-m", "omniopd", "eval", "--model", args.student, "--data", args.data,
        "--output", str(out), "--max-new-tokens", str(cfg.eval.max_new_tokens), "--batch-size", str(cfg.eval.batch_size),
        "--engine", cfg.eval.engine, "--gguf-dtype", cfg.eval.gguf_dtype, "--no-progress",
    ]  # fmt: skip
    if args.base_gguf:
        cmd += ["--gguf-template", args.base_gguf]
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        return {"lr": 0.0, "status": f"failed: {proc.stderr.strip().splitlines()[-1:]}"}
    s = json.loads(out.read_text())
    return {"lr": 0.0, "status": "ok (the starting model)", "validation": {k: s[k] for k in ("accuracy", "ci95", "n")}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    p.add_argument("--student", required=True, help="the model the stage starts from (a run's final/)")
    p.add_argument("--base-gguf", default=None, help="the GGUF the student came from (llama.cpp evaluation)")
    p.add_argument("--method", default="omniopd")
    p.add_argument("--lr", type=float, nargs="+", required=True)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--data", default="mbpp:validation", help="the validation split (never a benchmark)")
    p.add_argument("--runs", default="runs/lr-sweep")
    p.add_argument("--output", required=True)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from omniopd.config import load_config
    from omniopd.data import CODE_BENCHMARKS

    if args.data.lower() in CODE_BENCHMARKS:
        raise SystemExit(f"lr_sweep: --data {args.data} is a benchmark; score the sweep on a validation split")
    cfg = load_config(args.recipe, args.overrides)
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    report: dict = {
        "recipe": args.recipe,
        "overrides": args.overrides,
        "student": args.student,
        "method": args.method,
        "steps": args.steps,
        "rollouts_per_run": args.steps * cfg.optim.prompts_per_step * cfg.rollout.samples_per_prompt,
        "validation_data": args.data,
        "runs": [],
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    for lr in [None, *args.lr]:
        row = _score_start(args, runs, cfg) if lr is None else _train(args.recipe, runs / f"lr-{lr:g}", lr, args)
        report["runs"].append(row)
        output.write_text(json.dumps(report, indent=2))
        v = row.get("validation") or {}
        print(f"lr {row['lr']:g}: {row['status']}  validation {v.get('accuracy', float('nan')):.3f}", flush=True)
    ok = [r for r in report["runs"] if r.get("validation") and r["lr"] > 0]
    report["chosen_lr"] = max(ok, key=lambda r: r["validation"]["accuracy"])["lr"] if ok else None
    output.write_text(json.dumps(report, indent=2))
    print(f"chosen lr: {report['chosen_lr']}")


if __name__ == "__main__":
    main()

"""Median seconds per phase of an OmniOPD step at the default recipe's shapes.

    python benchmarks/step_breakdown.py --output step_breakdown.json [--steps 4] [--quick] [--recipe R] [key=value ...]

Runs ``--steps`` real training steps (the default student and privileged teacher, no evaluation) and
writes the median of each phase -- rollout, entropy, teacher, phi, loss_backward, optimizer -- and of
the whole step, tokens per second (the student's sampled tokens per rollout second and per step second,
the teacher's generated tokens per teacher second), with a description of the machine (the GPU's name
when there is one). The first step is included: nothing is warmed up
separately, so the numbers are what a user sees.

Decoding (``rollout.compile``, see ``omniopd.engine.decoding``): ``decoding`` names the mode, the seconds spent
compiling (the student's inside ``rollout``, per step; the local teacher's inside ``teacher``, in all) and
whether the entropy came from the rollout itself (``entropy`` is then only the anchor bookkeeping, near 0)
or from a second forward. ``--quick`` runs 2 steps at tiny shapes (a check that the script runs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHASES = {
    "rollout": "time/rollout_s",
    "entropy": "time/entropy_s",
    "teacher": "time/teacher_s",
    "phi": "time/phi_s",
    "loss_backward": "time/loss_backward_s",
    "optimizer": "time/optimizer_s",
}
# a tiny step: checks that a benchmark script runs (not a measurement)
QUICK_OVERRIDES = [
    "optim.prompts_per_step=1", "rollout.samples_per_prompt=2", "rollout.max_new_tokens=24", "audit.chunk_tokens=4",
    "audit.num_chunks=2", "audit.teacher_samples=2",
]


def decoding_info(cfg, rows: list[dict]) -> dict:
    """The decoding path the steps took: compile mode, compile seconds, where the entropy came from."""
    return {
        "rollout_compile": cfg.rollout.compile,
        "student_compile_s_per_step": [r.get("time/compile_s", 0.0) for r in rows],
        "teacher_compile_s_total": rows[-1].get("teacher/total_compile_s", 0.0) if rows else 0.0,
        "entropy_from_rollout": [bool(r.get("audit/entropy_from_rollout", 0.0)) for r in rows],
    }


def machine() -> dict:
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": sys.version.split()[0],
    }


def _sampled(row: dict) -> float:
    """The student's sampled response tokens in a step (all trajectories)."""
    return row["rollout/mean_length"] * row["rollout/trajectories"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--output", required=True)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="2 steps at tiny shapes: checks that the script runs")
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "gsm8k-smollm2-cpu.yaml"))
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.quick:
        args.steps = min(args.steps, 2)
        args.overrides = [*QUICK_OVERRIDES, *args.overrides]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from omniopd.config import load_config
    from omniopd.training.trainer import setup, train_step

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(args.recipe, [*args.overrides, f"output_dir={tmp}/run", "eval.before=false", "eval.after=false"])
        t0 = time.perf_counter()
        state = setup(cfg, overwrite=True)
        setup_s = time.perf_counter() - t0
        rows = [train_step(state) for _ in range(args.steps)]
    result = {
        "recipe": args.recipe,
        "overrides": args.overrides,
        "steps": args.steps,
        "quick": args.quick,
        "shapes": {
            "trajectories_per_step": cfg.optim.prompts_per_step * cfg.rollout.samples_per_prompt,
            "max_new_tokens": cfg.rollout.max_new_tokens,
            "chunk_tokens": cfg.audit.chunk_tokens,
            "num_chunks": cfg.audit.num_chunks,
            "teacher_samples": cfg.audit.teacher_samples,
            "teacher": cfg.teacher.type,
        },
        "phases_s": {name: statistics.median(r.get(key, 0.0) for r in rows) for name, key in PHASES.items()},
        "step_s": statistics.median(r["time/step_s"] for r in rows),
        "tokens_per_s": {
            "rollout": statistics.median(_sampled(r) / r["time/rollout_s"] for r in rows),
            "step": statistics.median(_sampled(r) / r["time/step_s"] for r in rows),
            "teacher_generated": statistics.median(r.get("teacher/tokens_out", 0.0) / max(r.get("time/teacher_s", 0.0), 1e-9) for r in rows),
        },
        "per_step": [
            {name: r.get(key, 0.0) for name, key in PHASES.items()}
            | {"step_s": r["time/step_s"], "mean_length": r["rollout/mean_length"], "sampled_tokens": _sampled(r),
               "chunks": r.get("audit/chunks", 0.0), "teacher_tokens_in": r.get("teacher/tokens_in", 0.0),
               "teacher_tokens_out": r.get("teacher/tokens_out", 0.0)}
            for r in rows
        ],
        "decoding": decoding_info(cfg, rows),
        "setup_s": setup_s,
        "machine": machine(),
    }
    Path(args.output).write_text(json.dumps(result, indent=2))
    print(json.dumps({"phases_s": result["phases_s"], "step_s": result["step_s"], "tokens_per_s": result["tokens_per_s"],
                      "decoding": result["decoding"]}, indent=2))


if __name__ == "__main__":
    main()

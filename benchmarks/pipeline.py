"""Seconds per step with and without the one-step-off-policy pipeline, against an API teacher with latency.

    python benchmarks/pipeline.py --output pipeline.json [--steps 4] [--latencies 0.5 2.0] [--quick] [key=value ...]

For each injected latency (seconds per request) the same short OmniOPD run is trained twice, once with
``pipeline.mode=off`` (on-policy: sample, then wait for the audit) and once with ``pipeline.mode=one_step``
(the audit of step t in a worker thread while step t+1 is sampled, ``omniopd.training.pipeline``). The student is
the real SmolLM2-135M-Instruct at small shapes; the teacher is ``openai-completions`` pointed at the local
fake provider (``omniopd.testing.fake_providers``), which answers every request after ``latency_s``. The
server runs in a child process, so its request handling does not share the trainer's GIL, as a remote API
would not. The teacher keeps 32 requests in flight (``max_concurrency=32``, adaptive concurrency off) and
no response cache (every request is sent).

Written for each run: every step's seconds (``time/step_s``), the logged staleness, the sampling seconds,
the audit's wall seconds, the seconds the student waited for the teacher (``student_wait_s``: on-policy, the
teacher's and phi's seconds, ``time/teacher_s + time/phi_s``; pipelined, ``time/teacher_wait_s``) and the audit
seconds that ran beside sampling. The figure to compare is the mean step seconds, the run's total over its
steps: the pipeline moves work between steps (its first step samples two batches, its last none), so a single
step's seconds, or a median of them, are not comparable across modes. The first step is included (nothing is
warmed up separately). ``--quick`` runs 2 steps at tiny shapes (a check that the script runs, not a
measurement).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from teacher_io import ServerProcess  # noqa: E402  (the fake provider in a child process)

ROOT = Path(__file__).resolve().parents[1]
NO_KEY_ENV = "OMNIOPD_BENCH_UNSET_KEY"
SHAPES = [
    "optim.prompts_per_step=4", "rollout.samples_per_prompt=2", "rollout.max_new_tokens=48", "rollout.batch_size=8",
    "audit.chunk_tokens=8", "audit.num_chunks=2", "audit.teacher_samples=4", "optim.micro_batch_size=8",
]
QUICK_SHAPES = [
    "optim.prompts_per_step=1", "rollout.samples_per_prompt=2", "rollout.max_new_tokens=16", "audit.chunk_tokens=4",
    "audit.num_chunks=2", "audit.teacher_samples=2",
]
PER_STEP = {
    "step_s": "time/step_s", "staleness": "pipeline/staleness", "rollout_s": "time/rollout_s",
    "audit_s": "time/audit_s", "teacher_s": "time/teacher_s", "teacher_wait_s": "time/teacher_wait_s",
    "overlap_s": "time/overlap_s", "loss_backward_s": "time/loss_backward_s", "teacher_requests": "teacher/requests",
}


def _per_step(row: dict) -> dict:
    out = {name: row.get(key, 0.0) for name, key in PER_STEP.items()}
    out["staleness"] = row.get("pipeline/staleness")  # None: the on-policy run logs none (it is 0)
    out["student_wait_s"] = (row["time/teacher_wait_s"] if "time/teacher_wait_s" in row
                             else row.get("time/teacher_s", 0.0) + row.get("time/phi_s", 0.0))
    out["sampled_tokens"] = row["rollout/mean_length"] * row["rollout/trajectories"]
    return out


def run(mode: str, latency_s: float, steps: int, overrides: list[str], out_dir: Path) -> dict:
    from omniopd.config import build_config
    from omniopd.training.trainer import setup, train_step

    with ServerProcess(latency_s) as server:
        cfg = build_config({
            "output_dir": str(out_dir / f"{mode}-{latency_s:g}"), "max_steps": steps, "seed": 0,
            "student": {"name": "smollm2-135m-instruct"},
            "teacher": {"type": "openai-completions", "model": "fake-teacher", "base_url": server.url + "/v1",
                        "api_key_env": NO_KEY_ENV, "cache": False, "max_concurrency": 32,
                        "adaptive_concurrency": False, "timeout_s": 60.0 + 4 * latency_s},
            "eval": {"before": False, "after": False},
            "pipeline": {"mode": mode},
        }, overrides)
        t0 = time.perf_counter()
        state = setup(cfg, overwrite=True)
        setup_s = time.perf_counter() - t0
        try:
            rows = [train_step(state) for _ in range(steps)]
        finally:
            state.pipeline.close()
            state.teacher.close()
    per_step = [_per_step(r) for r in rows]
    return {
        "pipeline": mode, "latency_s": latency_s, "steps": steps, "setup_s": setup_s,
        "total_s": sum(r["step_s"] for r in per_step),
        "step_s_mean": statistics.fmean(r["step_s"] for r in per_step),
        "student_wait_s_total": sum(r["student_wait_s"] for r in per_step),
        "overlap_s_total": sum(r["overlap_s"] for r in per_step),
        "rollout_s_total": sum(r["rollout_s"] for r in per_step),
        "staleness": [r["staleness"] for r in per_step],
        "per_step": per_step,
    }


def machine() -> dict:
    import torch

    return {
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": sys.version.split()[0],
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--output", required=True)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--latencies", type=float, nargs="+", default=[0.5, 2.0])
    ap.add_argument("--quick", action="store_true", help="2 steps at tiny shapes: checks that the script runs")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    shapes = QUICK_SHAPES if args.quick else SHAPES
    if args.quick:
        args.steps = min(args.steps, 2)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.pop(NO_KEY_ENV, None)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for latency in args.latencies:
            for mode in ("off", "one_step"):
                runs.append(run(mode, latency, args.steps, [*shapes, *args.overrides], Path(tmp)))
                print(json.dumps({k: runs[-1][k] for k in ("pipeline", "latency_s", "step_s_mean", "student_wait_s_total",
                                                              "staleness")}), flush=True)
    table = []
    for latency in args.latencies:
        off, on = (next(r for r in runs if r["latency_s"] == latency and r["pipeline"] == m) for m in ("off", "one_step"))
        table.append({
            "latency_s": latency, "steps": args.steps,
            "off_step_s_mean": off["step_s_mean"], "one_step_step_s_mean": on["step_s_mean"],
            "ratio_one_step_to_off": on["step_s_mean"] / off["step_s_mean"],
            "off_student_wait_s_per_step": [r["student_wait_s"] for r in off["per_step"]],
            "one_step_student_wait_s_per_step": [r["student_wait_s"] for r in on["per_step"]],
            "one_step_overlap_s_per_step": [r["overlap_s"] for r in on["per_step"]],
            "one_step_staleness": on["staleness"],
        })
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "quick": args.quick, "steps": args.steps, "overrides": [*shapes, *args.overrides],
        "teacher": {"type": "openai-completions (fake provider, child process)", "max_concurrency": 32,
                    "adaptive_concurrency": False, "response_cache": False},
        "table": table, "runs": runs, "machine": machine(),
    }
    Path(args.output).write_text(json.dumps(result, indent=2))
    print(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()

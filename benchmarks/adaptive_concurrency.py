"""Adaptive concurrency against a server that answers one request at a time: chunks lost and seconds per step.

Trains the default CPU recipe (``recipes/gsm8k-smollm2-cpu.yaml``: 4 trajectories, M=3 chunks, N=4) for
``--steps`` steps with an ``openai-completions`` teacher pointed at the fake provider
(``omniopd.testing.fake_providers``) shaped like ``transformers serve`` on a busy machine: one request worked on
at a time (``max_in_flight=1``), ``--latency`` seconds each, one choice per request whatever ``n`` asks (so
each chunk costs N requests: one, then a top-up round). The teacher's ``timeout_s`` is ``--timeout``; every
other teacher setting is its default (``max_concurrency`` 16, ``max_retries`` 5, backoff from 1 s). Two arms,
each on a fresh server: ``adaptive_concurrency`` on (the default) and off (every request in flight at once, up
to 16: the behaviour before). ``audit.max_failed_chunk_frac`` is 1 so a step that loses chunks still finishes
and is counted. Per arm: chunks planned and lost, seconds per step, requests (sent by the teacher and
received by the server), retries, the concurrency limit after each step and its reductions.

    PYTHONPATH=src python benchmarks/adaptive_concurrency.py --output adaptive_concurrency.json
    PYTHONPATH=src python benchmarks/adaptive_concurrency.py --steps 1 --max-new-tokens 64 --output /tmp/ac.json

Loopback only; nothing is downloaded (the packaged student, ``../shared/data``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "gsm8k-smollm2-cpu.yaml"
NO_KEY_ENV = "OMNIOPD_BENCH_UNSET_KEY"  # unset: the teacher sends a dummy key to the local server


def run_arm(adaptive: bool, args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    from omniopd.config import load_config
    from omniopd.testing.fake_providers import FakeProviderServer
    from omniopd.training.trainer import train

    with FakeProviderServer(latency_s=args.latency, max_choices=1, max_in_flight=1) as server:
        overrides = [
            f"output_dir={out_dir}", f"max_steps={args.steps}", f"rollout.max_new_tokens={args.max_new_tokens}",
            "eval.before=false", "eval.after=false", "eval.every_steps=0", "audit.max_failed_chunk_frac=1.0",
            "checkpoint.every_steps=0", "teacher.type=openai-completions", "teacher.model=fake-teacher",
            f"teacher.base_url={server.url}/v1", f"teacher.api_key_env={NO_KEY_ENV}", "teacher.cache=false",
            f"teacher.timeout_s={args.timeout}", f"teacher.adaptive_concurrency={str(adaptive).lower()}",
        ]
        cfg = load_config(str(RECIPE), overrides)
        started = time.perf_counter()
        train(cfg, overwrite=True, progress=False)
        wall = time.perf_counter() - started
        received = server.count()
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    lost = [int(r["teacher/failed_chunks"]) for r in rows]
    kept = [int(r["audit/chunks"]) for r in rows]
    return {
        "adaptive_concurrency": adaptive,
        "chunks_planned": [a + b for a, b in zip(kept, lost, strict=True)],
        "chunks_lost": lost,
        "chunks_lost_total": sum(lost),
        "step_s": [round(r["time/step_s"], 2) for r in rows],
        "step_s_mean": round(sum(r["time/step_s"] for r in rows) / len(rows), 2),
        "teacher_s": [round(r.get("time/teacher_s", float("nan")), 2) for r in rows],  # waiting on the teacher
        "teacher_requests": int(rows[-1]["teacher/total_requests"]),  # the start-of-run check included
        "server_requests": received,
        "retries": int(rows[-1]["teacher/total_retries"]),
        "failed_requests": int(rows[-1]["teacher/total_failed_requests"]),
        "concurrency_after_step": [r["teacher/concurrency"] for r in rows],
        "concurrency_reductions": int(rows[-1]["teacher/total_concurrency_reductions"]),
        "run_s": round(wall, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", required=True)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--latency", type=float, default=0.6, help="seconds the server works on each request")
    p.add_argument("--timeout", type=float, default=2.0, help="the teacher's timeout_s")
    p.add_argument("--max-new-tokens", type=int, default=192, help="rollout.max_new_tokens (the recipe's: 192)")
    p.add_argument("--arms", default="on,off", help="which arms to run: on, off or on,off")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.pop(NO_KEY_ENV, None)
    arms = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.arms.split(","):
            arms[name] = run_arm(name == "on", args, Path(tmp) / name)
            print(json.dumps({name: arms[name]}))
    result = {
        "benchmark": "adaptive_concurrency",
        "recipe": str(RECIPE.relative_to(ROOT)),
        "server": {"max_in_flight": 1, "latency_s": args.latency, "choices_per_request": 1},
        "teacher": {"type": "openai-completions", "timeout_s": args.timeout, "other_settings": "defaults"},
        "steps": args.steps,
        "rollout_max_new_tokens": args.max_new_tokens,
        "arms": arms,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
    }
    Path(args.output).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()

"""Equal behaviour across a restructure: fixed-seed 2-step runs of every method on a tiny random student, their
logged metrics written to JSON, and (``--against``) compared value for value with an earlier run of this script.

    python scripts/equal_behaviour.py --output /tmp/before.json                        # on the old commit
    python scripts/equal_behaviour.py --output /tmp/after.json --against /tmp/before.json

Timings (``time/*``, ``*_s``, throughput) differ between runs and are left out; every other metric of every step
must be equal (to 1e-9 relative, which float32 training on one machine meets exactly or not at all).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import yaml
from _tiny_setup import ROOT, tiny_student_and_data

# (name, overrides): every method, and the departures that change the loss
ARMS = {
    "omniopd": {"method": "omniopd"},
    "omniopd-centered": {"method": "omniopd", "audit": {"target": "centered"}},
    "omniopd-constant": {"method": "omniopd", "audit": {"constant_k": 1.0}},
    "sft-teacher": {"method": "sft", "sft": {"source": "teacher"}},
    "sft-reference": {"method": "sft", "sft": {"source": "reference"}},
    "opd-sampled": {"method": "opd", "opd": {"estimator": "sampled"}},
    "opd-full": {"method": "opd", "opd": {"estimator": "full"}},
    "grpo": {"method": "grpo"},
    "grpo-kl": {"method": "grpo", "grpo": {"kl_coef": 0.05}},
}


def _timing(key: str) -> bool:
    return key.startswith(("time/", "throughput/")) or key.endswith(("_s", "_per_s", "/seconds")) or "wall" in key


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out.get(k, {}), v) if isinstance(v, dict) else v
    return out


def run_all(tmp: Path, model: Path, data: Path, env: dict) -> dict[str, list[dict]]:
    base = {
        "max_steps": 2,
        "seed": 0,
        "student": {"name": str(model)},
        "teacher": {"type": "local", "model": str(model), "batch_size": 16},
        "audit": {"chunk_tokens": 4, "num_chunks": 2, "teacher_samples": 3},
        "rollout": {"samples_per_prompt": 2, "max_new_tokens": 24, "batch_size": 8},
        "optim": {"lr": 1e-3, "prompts_per_step": 2, "micro_batch_size": 2},
        "data": {"train": str(data)},
        "eval": {"before": False, "after": False},
    }
    out: dict[str, list[dict]] = {}
    for name, extra in ARMS.items():
        run_dir = tmp / name
        recipe = tmp / f"{name}.yaml"
        recipe.write_text(yaml.safe_dump(_merge(base, {**extra, "output_dir": str(run_dir)})))
        env = {**env, "OMNIOPD_CACHE": str(tmp / "cache" / name)}  # no response cache shared between arms
        proc = subprocess.run(
            [sys.executable, "-m", "omniopd", "train", str(recipe), "--overwrite", "--no-progress"],
            env=env,
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise SystemExit(f"{name}: train failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        out[name] = [{k: v for k, v in r.items() if not _timing(k)} for r in rows]
        print(f"{name}: {len(rows)} steps, {len(out[name][0])} metrics", flush=True)
    return out


def differences(before: dict, after: dict) -> list[str]:
    diffs = []
    for name in sorted(set(before) | set(after)):
        a, b = before.get(name), after.get(name)
        if a is None or b is None:
            diffs.append(f"{name}: only in {'after' if a is None else 'before'}")
            continue
        for i, (ra, rb) in enumerate(zip(a, b, strict=False)):
            for k in sorted(set(ra) | set(rb)):
                va, vb = ra.get(k), rb.get(k)
                same = va == vb or (
                    isinstance(va, (int, float))
                    and isinstance(vb, (int, float))
                    and math.isclose(va, vb, rel_tol=1e-9, abs_tol=1e-12)
                )
                if not same:
                    diffs.append(f"{name} step {i + 1} {k}: {va!r} -> {vb!r}")
        if len(a) != len(b):
            diffs.append(f"{name}: {len(a)} steps -> {len(b)}")
    return diffs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True)
    p.add_argument("--against", default=None, help="an earlier output of this script to compare with")
    args = p.parse_args()
    tmp, model, data, env = tiny_student_and_data()
    env["PYTHONPATH"] = str(ROOT / "src")
    metrics = run_all(tmp, model, data, env)
    Path(args.output).write_text(json.dumps(metrics, indent=1, sort_keys=True))
    if args.against:
        diffs = differences(json.loads(Path(args.against).read_text()), metrics)
        for d in diffs[:50]:
            print(d)
        n = sum(len(rows) * len(rows[0]) for rows in metrics.values() if rows)
        print(f"{n} metric values over {len(metrics)} runs; {len(diffs)} differ")
        raise SystemExit(1 if diffs else 0)


if __name__ == "__main__":
    main()

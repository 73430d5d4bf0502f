"""Evaluate one model on every named benchmark and write a markdown table (and JSON) of the results.

    python benchmarks/eval_table.py --model smollm2-135m-instruct --output out/base [--limit-scale 1.0]

Greedy decoding, one sample per problem; the limits and token budgets below are sized for a 2-core
CPU and are written into the table. Each benchmark's per-problem records sit next to its summary.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

# benchmark -> (limit, max_new_tokens)
PLAN = {
    "gsm8k-dev": (100, 256),
    "math500": (50, 384),
    "amc23": (40, 384),
    "aime24": (30, 384),
    "humaneval": (50, 384),
    "mbppplus": (50, 256),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--output", required=True, help="a folder")
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--benchmarks", nargs="*", default=list(PLAN))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from omniopd.engine.models import load_model
    from omniopd.evaluation.runner import HFGenerator, evaluate

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    model, tok = load_model(args.model)
    gen = HFGenerator(model, tok, args.model)
    rows = []
    for bench in args.benchmarks:
        limit, max_new = PLAN[bench]
        t0 = time.perf_counter()
        s = evaluate(gen, bench, limit=limit, max_new_tokens=max_new, batch_size=args.batch_size,
                     records_path=out / f"{bench}_records.jsonl", show_progress=False)
        s["wall_s"] = time.perf_counter() - t0
        (out / f"{bench}.json").write_text(json.dumps(s, indent=2))
        rows.append((bench, limit, max_new, s))
        print(f"{bench}: {100 * s['accuracy']:.1f}% [{100 * s['ci95'][0]:.1f}, {100 * s['ci95'][1]:.1f}] n={s['n']} in {s['wall_s']:.0f}s", flush=True)
    lines = [f"Model: `{args.model}` — greedy, 1 sample per problem, batch {args.batch_size}", "",
             "| benchmark | problems | max new tokens | pass@1 / accuracy | 95% CI | truncated | unparsed | wall time |",
             "|---|---|---|---|---|---|---|---|"]
    for bench, limit, max_new, s in rows:
        unparsed = f"{100 * s['answers_unparsed']:.0f}%" if "answers_unparsed" in s else "n/a"
        lines.append(f"| {bench} | {s['n']} | {max_new} | {100 * s['accuracy']:.1f}% | {100 * s['ci95'][0]:.1f}–{100 * s['ci95'][1]:.1f}% "
                     f"| {100 * s['truncated_frac']:.0f}% | {unparsed} | {s['wall_s']:.0f} s |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

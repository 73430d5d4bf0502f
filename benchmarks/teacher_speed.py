"""Teacher seconds per step: the Hugging Face in-process teacher against llama.cpp, at a recipe's shapes.

    python benchmarks/teacher_speed.py --output teacher_speed.json [--recipe recipes/compare-code-cpu.yaml]
                                       [--steps 2] [--repeats 3] [--quick] [key=value ...]

The teacher batches are recorded from real student rollouts of the recipe (``omniopd.diagnostics.estimate.rollout_calls``:
the audit's own requests, e.g. 12 chunks of 4 trajectories per step on the code recipe, N=4 continuations of C=24
tokens, Qwen2.5-Coder-0.5B continuing SmolLM2's decoded text). Each batch is then answered by both backends,
interleaved (HF, llama.cpp, HF, llama.cpp, ...), ``--repeats`` times, the same seed; the first call of each backend
is a warm-up and not counted. ``hf`` is ``teacher.type=local`` with the recipe's settings (batch size, prefix
sharing; the dequantized fp32 model), ``llamacpp`` is ``teacher.type=llamacpp`` on the same GGUF file (its response
cache off, so every call decodes). ``speedup`` = median HF seconds / median llama.cpp seconds per step.
Overrides apply to the recipe (e.g. ``teacher.n_parallel=32``) before both teachers are built.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_breakdown import machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", required=True)
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "compare-code-cpu.yaml"))
    ap.add_argument("--steps", type=int, default=2, help="steps of recorded teacher batches")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per batch and backend")
    ap.add_argument("--quick", action="store_true", help="one step, one repeat, short continuations (a smoke run)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    from omniopd.config import load_config
    from omniopd.diagnostics.estimate import rollout_calls
    from omniopd.teachers.llamacpp import LlamaCppTeacher
    from omniopd.teachers.local import LocalTeacher

    overrides = list(args.overrides)
    if args.quick:
        args.steps, args.repeats = 1, 1
        overrides += ["audit.chunk_tokens=8", "rollout.max_new_tokens=64"]
    cfg = load_config(args.recipe, overrides)
    t = cfg.teacher
    model = t.model or cfg.student.name
    t0 = time.perf_counter()
    calls, _ = rollout_calls(cfg, prompts=args.steps * cfg.optim.prompts_per_step)
    record_s = time.perf_counter() - t0
    hf = LocalTeacher.from_name(
        model,
        privileged=t.type == "privileged" or bool(getattr(t, "privileged", False)),
        batch_size=getattr(t, "batch_size", 48),
        share_prefixes=getattr(t, "share_prefixes", True),
    )
    llama_opts = {k: v for k, v in t.model_dump().items() if k in ("n_ctx", "n_parallel", "n_batch", "n_threads")}
    ll = LlamaCppTeacher.from_name(model, privileged=hf.privileged, cache_path=None, **llama_opts)
    backends = {"hf": hf, "llamacpp": ll}
    times: dict[str, list[float]] = {k: [] for k in backends}
    tokens: dict[str, list[int]] = {k: [] for k in backends}
    for name, teacher in backends.items():  # warm-up: first-call costs (allocation, caches) are not a step's
        teacher.continue_prefixes(*calls[0])
    for rep in range(args.repeats):
        for requests, spec in calls:
            for name, teacher in backends.items():
                t1 = time.perf_counter()
                out = teacher.continue_prefixes(requests, spec)
                times[name].append(time.perf_counter() - t1)
                tokens[name].append(sum(r.completion_tokens for r in out))
                print(f"repeat {rep + 1} {name}: {times[name][-1]:.2f} s, {tokens[name][-1]} tokens", flush=True)
    median = {k: statistics.median(v) for k, v in times.items()}
    requests, spec = calls[0]
    report = {
        "machine": machine(),
        "recipe": str(args.recipe),
        "overrides": overrides,
        "teacher_model": model,
        "shapes": {
            "requests_per_step": [len(c[0]) for c in calls],
            "n": spec.n,
            "max_new_tokens": spec.max_new_tokens,
            "temperature": spec.temperature,
            "top_p": spec.top_p,
        },
        "record_rollouts_s": record_s,
        "seconds_per_step": times,
        "completion_tokens_per_step": tokens,
        "median_s": median,
        "tokens_per_s": {k: sum(tokens[k]) / sum(times[k]) for k in backends},
        "speedup": median["hf"] / median["llamacpp"],
        "llamacpp_prefill": ll.engine.prefill_stats,
        "hf_prefill": hf.prefill_stats,
    }
    Path(args.output).write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("median_s", "tokens_per_s", "speedup")}, indent=2))
    ll.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

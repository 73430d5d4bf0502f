"""Decoding throughput: plain ``generate`` against the compiled static-cache path (``omniopd.engine.decoding``).

    python benchmarks/decoding.py --output decoding.json [--quick] [--device cpu|cuda] [--teacher NAME|student]
                                  [--batch-sizes 4 16] [--max-new-tokens 128] [--repeats 3]
                                  [--teacher-requests 4] [--teacher-samples 10] [--teacher-tokens 50]

Student (the packaged smollm2-135m-instruct): GSM8K dev prompts in the student's chat template, batch 4 and
16, three paths -- ``plain`` (``generate`` as before, nothing recorded), ``plain+stats`` (the rollout's
path: entropy and log p recorded while sampling) and ``compiled+stats`` (``rollout.compile=on``). Every row
decodes exactly ``--max-new-tokens`` tokens (``min_new_tokens`` is set to it, for the measurement only), so
tokens/s compares the same work. Teacher (``--teacher``: the packaged qwen2.5-coder-0.5b-instruct, or
``student`` for a second copy of the student): ``LocalTeacher.continue_prefixes`` on ``--teacher-requests``
chunk prefixes with N = ``--teacher-samples`` continuations of C = ``--teacher-tokens`` tokens, compile off
against on, the same seed; tokens/s counts the continuations' tokens.

For each configuration the first call is timed on its own (``first_call_s``; on the compiled path it holds the
compilation, whose seconds transformers/dynamo report as ``compile_s``), then ``--repeats`` calls give the
median. ``--quick`` shrinks everything (a check that the script runs, not a measurement).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_breakdown import machine  # noqa: E402

STUDENT = "smollm2-135m-instruct"
TEACHER = "qwen2.5-coder-0.5b-instruct"


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device) -> tuple[float, object]:
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t0, out


def _measure(fn, device, repeats: int, model) -> dict:
    """First call alone (compile seconds counted apart), then the median of ``repeats`` calls."""
    from omniopd.engine import decoding

    c0 = decoding.compile_seconds(model)
    first_s, tokens = _timed(fn, device)
    c1 = decoding.compile_seconds(model)
    runs = [_timed(fn, device) for _ in range(repeats)]
    secs = [s for s, _ in runs] or [first_s]
    med = statistics.median(secs)
    return {"first_call_s": first_s, "compile_s": c1 - c0, "compile_s_after_first": decoding.compile_seconds(model) - c1,
            "median_s": med, "runs_s": secs, "tokens": tokens, "tokens_per_s": tokens / med if med > 0 else 0.0}


def student_bench(args, device) -> list[dict]:
    import torch

    from omniopd.data import load_examples
    from omniopd.engine import decoding
    from omniopd.engine.models import eos_token_ids, load_model
    from omniopd.engine.prompts import student_messages
    from omniopd.engine.rollout import chat_prompts, generation_config

    model, tok = load_model(STUDENT)
    model.to(device)
    examples = load_examples("gsm8k-dev", limit=max(args.batch_sizes))
    prompts = chat_prompts(tok, [student_messages(ex.question) for ex in examples])
    tok.padding_side = "left"
    T = args.max_new_tokens
    rows = []
    for bs in args.batch_sizes:
        enc = tok(prompts[:bs], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        gen = generation_config(tok, eos_token_ids(model, tok), T, 1.0, 1.0)
        gen.min_new_tokens = T  # the same work on every path: every row decodes T tokens

        def run(compile: str, stats: bool, _enc=enc, _gen=gen, _bs=bs):
            def call():
                torch.manual_seed(0)
                if stats:
                    g, procs, rec = decoding.raw_stats_sampling(_gen)
                else:
                    g, procs, rec = _gen, None, None
                out = decoding.generate(model, _enc["input_ids"], _enc["attention_mask"], g, compile=compile,
                                        logits_processor=procs)
                new = out[:, _enc["input_ids"].shape[1] :]
                if rec is not None:
                    rec.result(new)
                return new.numel()
            return call

        for name, compile, stats in (("plain", "off", False), ("plain+stats", "off", True), ("compiled+stats", "on", True)):
            r = _measure(run(compile, stats), device, args.repeats, model)
            rows.append({"model": STUDENT, "batch": bs, "prompt_tokens_max": enc["input_ids"].shape[1],
                         "new_tokens": T, "path": name} | r)
            print(json.dumps({k: rows[-1][k] for k in ("batch", "path", "tokens_per_s", "first_call_s", "compile_s")}),
                  flush=True)
    return rows


def teacher_bench(args, device) -> list[dict]:
    from omniopd.data import load_examples
    from omniopd.engine.models import load_model
    from omniopd.teachers.base import ContinuationRequest, SamplingSpec
    from omniopd.teachers.local import LocalTeacher

    name = STUDENT if args.teacher == "student" else args.teacher
    model, tok = load_model(name)
    model.to(device)
    examples = load_examples("gsm8k-dev", limit=args.teacher_requests)
    requests = []
    for i, ex in enumerate(examples):  # a chunk prefix: the first part of the reference solution
        ref = ex.reference or ex.answer
        requests.append(ContinuationRequest(question=ex.question, prefix=ref[: max(1, len(ref) // 3)],
                                            reference=ex.reference, trajectory=i))
    spec = SamplingSpec(n=args.teacher_samples, max_new_tokens=args.teacher_tokens, temperature=1.0, top_p=1.0, seed=0)
    rows = []
    for mode in ("off", "on"):
        teacher = LocalTeacher(model, tok, name, privileged=False, batch_size=args.teacher_requests * args.teacher_samples,
                               compile=mode)

        def call(_t=teacher):
            return sum(r.completion_tokens for r in _t.continue_prefixes(requests, spec))

        r = _measure(call, device, args.repeats, model)
        rows.append({"model": name, "requests": len(requests), "samples_N": spec.n, "tokens_C": spec.max_new_tokens,
                     "path": "compiled" if mode == "on" else "plain", "reuse_prefix": teacher.reuse_prefix} | r)
        print(json.dumps({k: rows[-1][k] for k in ("model", "path", "tokens_per_s", "first_call_s", "compile_s")}),
              flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--output", required=True)
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks that the script runs")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--teacher", default=TEACHER, help=f"a model name, or 'student' (default {TEACHER})")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--teacher-requests", type=int, default=4)
    ap.add_argument("--teacher-samples", type=int, default=10)
    ap.add_argument("--teacher-tokens", type=int, default=50)
    ap.add_argument("--skip-teacher", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.batch_sizes, args.max_new_tokens, args.repeats = [2], 8, 1
        args.teacher_requests, args.teacher_samples, args.teacher_tokens = 2, 2, 8
        if args.teacher == TEACHER:
            args.teacher = "student"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    result = {
        "what": "tokens/s of plain generate vs the compiled static-cache path (omniopd.engine.decoding)",
        "quick": args.quick,
        "device": str(device),
        "settings": {k: v for k, v in vars(args).items() if k != "output"},
        "student": student_bench(args, device),
        "teacher": [] if args.skip_teacher else teacher_bench(args, device),
        "machine": machine(),
    }
    Path(args.output).write_text(json.dumps(result, indent=2))
    table = [(r["model"], r.get("batch", r.get("requests")), r["path"], round(r["tokens_per_s"], 1), round(r["compile_s"], 1))
             for r in result["student"] + result["teacher"]]
    print(json.dumps({"model/batch/path/tokens_per_s/compile_s": table}, indent=1))


if __name__ == "__main__":
    main()

"""Measure: a run against the fake provider with injected 429s, 500s and timeouts, and a cost-capped run."""
#   usage: PYTHONPATH=src python scripts/fault_run.py   (a tiny student; a local fake provider on 127.0.0.1)
import json
import subprocess
import sys

from _tiny_setup import tiny_student_and_data

from omniopd.config import build_config, dump_config
from omniopd.testing.fake_providers import FakeProviderServer, Fault

tmp, student, data, env = tiny_student_and_data()
route = "openai.completions"
with FakeProviderServer() as fake:
    def recipe(out, steps, **teacher):
        cfg = build_config({
            "output_dir": str(out), "max_steps": steps, "student": {"name": str(student)},
            "teacher": {"type": "openai-completions", "model": "fake", "base_url": fake.url + "/v1", "api_key_env": "UNSET_KEY_X",
                        "cache": False, "timeout_s": 1.0, "max_retries": 2, "max_concurrency": 1,
                        "backoff_base_s": 0.05, "backoff_max_s": 0.5, **teacher},
            "audit": {"chunk_tokens": 4, "num_chunks": 2, "teacher_samples": 3, "max_failed_chunk_frac": 0.5},
            "rollout": {"samples_per_prompt": 2, "max_new_tokens": 24, "batch_size": 8},
            "optim": {"prompts_per_step": 2, "micro_batch_size": 4, "lr": 1e-3},
            "data": {"train": str(data)}, "eval": {"before": False, "after": False}})
        p = tmp / f"{out.name}.yaml"
        p.write_text(dump_config(cfg))
        return p
    # 10 rate limits (Retry-After 0.2 s), 10 server errors, 4 responses slower than the 1 s timeout, and
    # 9 more 503s in a row: with 2 retries, some requests exhaust their retries and their chunks are dropped
    ok = Fault(route=route)  # answered normally
    # preflight (2 requests) ok; request A: 429 (Retry-After 0.2 s), 500, then ok; request B: slower than
    # the 1 s timeout, then ok; request C: 503 three times -> out of retries, its chunk dropped
    fake.inject(ok, ok, Fault.rate_limit(0.2, route), Fault.server_error(500, route), ok, Fault.slow(1.5, route), ok,
                *[Fault.server_error(503, route)] * 3)
    out = tmp / "faults"
    proc = subprocess.run([sys.executable, "-m", "omniopd", "train", str(recipe(out, 8)), "--no-progress"], env=env, capture_output=True, text=True)
    print("fault run exit", proc.returncode, proc.stderr.strip().splitlines()[-1:] if proc.returncode else "")
    rs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    print("steps", len(rs), "| chunks trained", sum(r["audit/chunks"] for r in rs), "| failed_chunks", sum(r["teacher/failed_chunks"] for r in rs),
          "| retries", rs[-1]["teacher/total_retries"], "| failed requests", rs[-1]["teacher/total_failed_requests"],
          "| requests", rs[-1]["teacher/total_requests"], "| p50/p95 latency %.3f/%.3f s" % (rs[-1]["teacher/total_latency_p50_s"], rs[-1]["teacher/total_latency_p95_s"]))
    out = tmp / "capped"
    proc = subprocess.run([sys.executable, "-m", "omniopd", "train", str(recipe(out, 100, price_input_per_mtok=100.0, price_output_per_mtok=100.0, max_cost_usd=0.2)), "--no-progress"],
                          env=env, capture_output=True, text=True)
    rs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    print("capped run exit", proc.returncode, "| steps done", len(rs), "| cost at last logged step $%.4f" % rs[-1]["teacher/total_cost_usd"])
    print("stderr:", [line for line in proc.stderr.splitlines() if line.startswith("omniopd")])
    print("final/ saved:", (out / "final" / "config.json").is_file())
    # a request that fails with no retry left: its chunk is dropped and counted, the step trains on the rest
    fake.inject(Fault(route=route), Fault(route=route), Fault.server_error(503, route), Fault.rate_limit(0.1, route))
    out = tmp / "dropped"
    proc = subprocess.run([sys.executable, "-m", "omniopd", "train", str(recipe(out, 2, max_retries=0)), "--no-progress"], env=env, capture_output=True, text=True)
    rs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for r in rs:
        print("dropped-run step", r["step"], "| chunks planned", r["teacher/requests"], "| trained", r["audit/chunks"], "| failed_chunks", r["teacher/failed_chunks"],
              "| failed requests (cum)", r["teacher/total_failed_requests"])

"""Measure: an API-teacher run killed mid-way and rerun pays only for what it had not paid (fake provider)."""
#   usage: PYTHONPATH=src python scripts/cache_kill.py  (a tiny student; a local fake provider on 127.0.0.1)
import json
import signal
import subprocess
import sys
import time

from _tiny_setup import tiny_student_and_data

from omniopd.config import build_config, dump_config
from omniopd.testing.fake_providers import FakeProviderServer

tmp, student, data, env = tiny_student_and_data()
with FakeProviderServer(latency_s=0.05) as fake:
    def recipe(out, **teacher):
        cfg = build_config({
            "output_dir": str(out), "max_steps": 6, "student": {"name": str(student)},
            "teacher": {"type": "openai-completions", "model": "fake", "base_url": fake.url + "/v1", "api_key_env": "UNSET_KEY_X",
                        "cache_path": str(tmp / "cache.sqlite"), "price_input_per_mtok": 0.25, "price_output_per_mtok": 1.25, **teacher},
            "audit": {"chunk_tokens": 4, "num_chunks": 2, "teacher_samples": 3},
            "rollout": {"samples_per_prompt": 2, "max_new_tokens": 24, "batch_size": 8},
            "optim": {"prompts_per_step": 2, "micro_batch_size": 4, "lr": 1e-3},
            "data": {"train": str(data)}, "eval": {"before": False, "after": False},
            "checkpoint": {"every_steps": 1, "keep_last": 2}})
        p = tmp / f"{out.name}.yaml"
        p.write_text(dump_config(cfg))
        return p
    out = tmp / "run"
    r = recipe(out)
    proc = subprocess.Popen([sys.executable, "-m", "omniopd", "train", str(r), "--no-progress"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (out / "checkpoints" / "step-000003").is_dir():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    sent_before = fake.count()
    killed_rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    print("killed after step", killed_rows[-1]["step"], "| HTTP requests sent so far:", sent_before,
          "| cost so far $%.6f" % killed_rows[-1]["teacher/total_cost_usd"])
    # rerun the killed run from scratch (same recipe, --overwrite): everything already paid comes from the cache
    proc = subprocess.run([sys.executable, "-m", "omniopd", "train", str(r), "--no-progress", "--overwrite"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows2 = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    last = rows2[-1]
    print("rerun: steps", last["step"], "| cache hits", last["teacher/total_cache_hits"], "| new HTTP requests", fake.count() - sent_before,
          "| ledger requests (paid)", last["teacher/total_requests"], "| cost of the rerun $%.6f" % last["teacher/total_cost_usd"])
    for row in rows2:
        print("  step", row["step"], "cache_hits(cum)", row["teacher/total_cache_hits"], "paid requests(cum)", row["teacher/total_requests"])

"""Training with an API teacher against the local fake provider: faults, budget cap, cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_train_tiny import _cfg

pytest.importorskip("openai")

from omniopd.config import build_config, dump_config  # noqa: E402
from omniopd.errors import TeacherError  # noqa: E402
from omniopd.testing.fake_providers import FakeProviderServer, Fault  # noqa: E402
from omniopd.training.trainer import train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NO_KEY_ENV = "OMNIOPD_TEST_UNSET_KEY"


@pytest.fixture()
def fake():
    with FakeProviderServer() as server:
        yield server


def _api_cfg(tiny_model_dir, data, out, fake, **teacher):
    base = _cfg(tiny_model_dir, data, out, {"type": "local"}).model_dump(mode="json")
    base["teacher"] = {"type": "openai-completions", "model": "fake-teacher", "base_url": fake.url + "/v1",
                       "api_key_env": NO_KEY_ENV, "cache": False, "max_concurrency": 4, "timeout_s": 2.0,
                       "backoff_base_s": 0.01, "backoff_max_s": 0.05, **teacher}
    base["eval"]["after"] = False
    base["audit"]["max_failed_chunk_frac"] = 0.9
    return build_config(base)


def _rows(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_faults_are_retried_and_dropped_chunks_counted(tiny_model_dir, gsm8k_like, tmp_path, fake):
    out = tmp_path / "run"
    route = "openai.completions"
    # a 429 with Retry-After, a 500, a response slower than the 2 s timeout: each retried and recovered;
    # then one request that fails every attempt (max_retries=1): its chunk is dropped and counted
    fake.inject(Fault.rate_limit(0.05, route), Fault.server_error(500, route), Fault.slow(3.0, route))
    cfg = _api_cfg(tiny_model_dir, gsm8k_like, out, fake, max_retries=2, max_concurrency=1)
    train(cfg, progress=False)
    rows = _rows(out)
    assert rows[-1]["teacher/total_retries"] >= 3
    assert sum(r["teacher/failed_chunks"] for r in rows) == 0
    out2 = tmp_path / "run2"
    # the start-of-run teacher check sends 2 requests (answered normally); then the first training
    # request fails and, with no retries left, its chunk is dropped
    fake.inject(Fault(route=route), Fault(route=route), Fault.server_error(503, route))
    train(_api_cfg(tiny_model_dir, gsm8k_like, out2, fake, max_retries=0, max_concurrency=1), progress=False)
    rows2 = _rows(out2)
    assert sum(r["teacher/failed_chunks"] for r in rows2) == 1
    assert rows2[-1]["teacher/total_failed_requests"] == 1
    assert rows2[0]["audit/chunks"] == rows2[0]["teacher/requests"] - 1  # the dropped chunk is not trained on


def test_too_many_failed_chunks_stop_the_run(tiny_model_dir, gsm8k_like, tmp_path, fake):
    fake.inject(*[Fault.server_error(500, "openai.completions")] * 200)
    cfg = _api_cfg(tiny_model_dir, gsm8k_like, tmp_path / "run", fake, max_retries=0)
    cfg = cfg.model_copy(update={"audit": cfg.audit.model_copy(update={"max_failed_chunk_frac": 0.5})})
    with pytest.raises(TeacherError, match="failed on"):
        train(cfg, progress=False)


def test_cost_cap_stops_the_run_cleanly_with_one_line(tiny_model_dir, gsm8k_like, tmp_path, fake):
    out = tmp_path / "run"
    cfg = _api_cfg(tiny_model_dir, gsm8k_like, out, fake, price_input_per_mtok=100.0, price_output_per_mtok=100.0,
                   max_cost_usd=0.1)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(dump_config(cfg.model_copy(update={"max_steps": 50})))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    env.pop(NO_KEY_ENV, None)
    proc = subprocess.run([sys.executable, "-m", "omniopd", "train", str(recipe), "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    [line] = [ln for ln in proc.stderr.splitlines() if ln.startswith("omniopd: error:")]
    assert "max_cost_usd" in line and "saved to" in line
    assert (out / "final" / "config.json").is_file()  # what was learnt before the cap is kept
    assert len(_rows(out)) < 50


def test_rerun_is_served_from_the_cache(tiny_model_dir, gsm8k_like, tmp_path, fake):
    cache = tmp_path / "cache.sqlite"
    first = _api_cfg(tiny_model_dir, gsm8k_like, tmp_path / "a", fake, cache=True, cache_path=str(cache))
    train(first, progress=False)
    sent = fake.count()
    rows = _rows(tmp_path / "a")
    assert rows[-1]["teacher/total_cache_hits"] == 0 and sent > 0
    again = first.model_copy(update={"output_dir": str(tmp_path / "b")})
    train(again, progress=False)
    rows_b = _rows(tmp_path / "b")
    assert fake.count() == sent  # nothing new was sent
    assert rows_b[-1]["teacher/total_cache_hits"] == rows[-1]["teacher/total_requests"]
    assert [r["audit/k_sem_mean"] for r in rows_b] == [r["audit/k_sem_mean"] for r in rows]

"""llama.cpp's own OpenAI-compatible server as an ``openai-completions`` teacher, on loopback.

The server is llama-cpp-python's ``python -m llama_cpp.server`` serving the packaged SmolLM2 GGUF. It comes with
the same build as ``teacher.type=llamacpp`` (``make install``), so it needs no second compile of llama.cpp (the
``llama-server`` binary would be a separate CMake build of the vendored source, several more minutes here). What it
does, read from its source (llama_cpp/server/app.py, llama.py) and checked here:

* ``n`` is dropped from the request (``exclude={"n", "best_of", ...}``): one choice whatever ``n`` says, so the
  completions teacher tops up to N with one-sample requests, each with its own seed (asserted below);
* its sampling defaults are not the raw distribution (top_k 40, min_p 0.05 and a repeat penalty of 1.1 in the
  request model), so the recipe sends every sampler parameter explicitly in ``teacher.extra_body``: top_k 0 (off),
  min_p 0, repeat_penalty 1, presence and frequency penalties 0, mirostat off;
* prompt caching: one model serves one request at a time, and each request reuses the evaluated tokens it shares
  with the previous one (the longest common prefix of ``Llama._input_ids``), so a trajectory's nested prefixes,
  sent shortest first (``dispatch=warm_first``), reuse each other's prefill; its RAM cache across prompts
  (``--cache``) is off by default.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("llama_cpp.server")
pytest.importorskip("openai")

from conftest import free_port, running_server
from omniopd.errors import ModelError

ROOT = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT_S = 120.0
NO_KEY_ENV = "OMNIOPD_TEST_UNSET_KEY"
ALIAS = "smollm2-gguf"
RAW_SAMPLING = {"top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
                "mirostat_mode": 0}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from omniopd.engine.models import gguf_file

    try:
        path = gguf_file("smollm2-135m-instruct")
    except ModelError as err:
        pytest.skip(f"the packaged SmolLM2 GGUF is unavailable: {err}")
    port = free_port()
    log_path = tmp_path_factory.mktemp("llama-server") / "server.log"
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(path), "--model_alias", ALIAS, "--host",
           "127.0.0.1", "--port", str(port), "--n_ctx", "4096", "--verbose", "false"]
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with running_server(cmd, url + "/v1/models", log_path, "llama_cpp.server", STARTUP_TIMEOUT_S, env):
        with urllib.request.urlopen(url + "/v1/models", timeout=5) as resp:
            models = [m["id"] for m in json.load(resp)["data"]]
        yield {"url": url, "models": models}


def _post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.load(resp)


def test_the_server_answers_one_choice_whatever_n_asks(server: dict[str, Any]) -> None:
    assert server["models"] == [ALIAS]
    out = _post(server["url"] + "/v1/completions",
                {"model": ALIAS, "prompt": "Once upon a time", "max_tokens": 4, "n": 3, "temperature": 1.0,
                 "seed": 1, **RAW_SAMPLING})
    assert len(out["choices"]) == 1


def test_one_omniopd_step_over_http(server: dict[str, Any], tmp_path: Path) -> None:
    """The default recipe, one step, its privileged teacher replaced by the server (sampling sent explicitly)."""
    from omniopd.config import load_config
    from omniopd.training.trainer import train

    out = tmp_path / "run"
    overrides = [
        f"output_dir={out}", "max_steps=1", "eval.before=false", "eval.after=false",
        "teacher.type=openai-completions", f"teacher.model={ALIAS}", f"teacher.base_url={server['url']}/v1",
        f"teacher.api_key_env={NO_KEY_ENV}", "teacher.cache=false", "teacher.max_concurrency=4",
        "teacher.timeout_s=120", "teacher.tokenizer=smollm2-135m-instruct",  # its chat template frames the prefix
        f"teacher.extra_body={json.dumps(RAW_SAMPLING)}",
        "rollout.max_new_tokens=48", "audit.num_chunks=2",
    ]
    cfg = load_config(str(ROOT / "recipes" / "gsm8k-smollm2-cpu.yaml"), overrides)
    assert cfg.teacher.privileged  # the recipe's privileged teacher keeps the reference solution in its prompt
    train(cfg, progress=False)
    [row] = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert row["audit/chunks"] > 0 and row["teacher/failed_chunks"] == 0
    # one choice per request: every chunk's N=4 texts (the start-of-run check's included) came as 1 request + 3
    # one-sample top-ups
    topups, requests = row["teacher/total_topup_requests"], row["teacher/total_requests"]
    assert topups >= 3 * row["audit/chunks"] and 4 * topups == 3 * requests
    audits = [json.loads(x) for x in (out / "audits.jsonl").read_text().splitlines()]
    chunks = [c for a in audits for c in a["chunks"]]
    assert all(len(c["continuations"]) == 4 for c in chunks)
    assert any(len(set(c["continuations"])) > 1 for c in chunks)  # sampled, each top-up with its own seed

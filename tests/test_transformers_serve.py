"""A real ``transformers serve`` (from ``transformers[serving]``) as the teacher's server.

A tiny random Llama (hidden size 32, 2 layers) with the real SmolLM2 tokenizer and chat template is saved
to a temp dir and served on 127.0.0.1; the OpenAI completions and chat teachers talk to it through the
official ``openai`` client. Two behaviours of the server shape this test:
* it answers one choice whatever ``n`` asks, so the completions teacher must top up to N;
* it samples only when the model's ``generation_config`` has ``do_sample=True`` (a request's
  ``temperature`` alone does not switch sampling on), so the tiny model is saved that way.
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

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("openai")

from conftest import free_port, running_server
from omniopd.errors import ModelError
from omniopd.teachers.base import ContinuationRequest, SamplingSpec
from omniopd.teachers.openai_backend import OpenAIChatTeacher, OpenAICompletionsTeacher

STARTUP_TIMEOUT_S = 120.0
NO_KEY_ENV = "OMNIOPD_TEST_UNSET_KEY"  # never send a developer's real key to the local server


def _tiny_model(target: Path) -> Any:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from omniopd.engine.models import load_tokenizer

    try:
        tok = load_tokenizer("smollm2-135m-instruct")
    except ModelError as err:
        pytest.skip(f"the packaged SmolLM2 tokenizer is unavailable: {err}")
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.generation_config = GenerationConfig(
        do_sample=True,
        top_k=0,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model.save_pretrained(target)
    tok.save_pretrained(target)
    return tok


def _serve_command(model_dir: Path, port: int) -> list[str]:
    script = Path(sys.executable).with_name("transformers")
    head = [str(script)] if script.exists() else [sys.executable, "-m", "transformers.cli.transformers"]
    return [
        *head,
        "serve",
        str(model_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--device",
        "cpu",
        "--log-level",
        "warning",
    ]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("transformers-serve")
    model_dir = root / "tiny-llama"
    tok = _tiny_model(model_dir)
    port = free_port()
    log_path = root / "serve.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
    url = f"http://127.0.0.1:{port}"
    with running_server(_serve_command(model_dir, port), url + "/health", log_path, "transformers serve",
                        STARTUP_TIMEOUT_S, env) as startup_s:
        with urllib.request.urlopen(url + "/v1/models", timeout=5) as resp:
            models = [m["id"] for m in json.load(resp)["data"]]
        yield {
            "url": url,
            "model": str(model_dir),
            "models": models,
            "tokenizer": tok,
            "startup_s": startup_s,
            "log": log_path,
        }


REQUESTS = [
    ContinuationRequest(question="What is 2 + 3?", prefix="We add ", trajectory=0),
    ContinuationRequest(question="What is 2 + 3?", prefix="We add 2 and 3 to get", trajectory=0),
]


def test_completions_teacher_gets_n_texts_from_transformers_serve(served: dict[str, Any]) -> None:
    assert served["model"] in served["models"]  # the pinned model is the one listed
    teacher = OpenAICompletionsTeacher(
        served["model"],
        base_url=served["url"] + "/v1",
        api_key_env=NO_KEY_ENV,
        tokenizer=served["tokenizer"],
        max_concurrency=4,
        timeout_s=60.0,
    )
    with teacher:
        assert teacher.prompt_text(REQUESTS[0]).startswith("<|im_start|>system")
        assert teacher.prompt_text(REQUESTS[0]).endswith("<|im_start|>assistant\nWe add ")
        results = teacher.continue_prefixes(REQUESTS, SamplingSpec(n=3, max_new_tokens=8, seed=1))
        metrics = teacher.metrics()
    assert [r.error for r in results] == [None, None]
    assert [len(r.texts) for r in results] == [3, 3]
    assert all(len(set(r.texts)) > 1 for r in results)  # really sampled (do_sample in generation_config)
    # one choice per request whatever n says: two top-ups per chunk
    assert metrics["teacher/requests"] == 6 and metrics["teacher/topup_requests"] == 4
    assert metrics["teacher/tokens_in"] > 0 and metrics["teacher/tokens_out"] > 0


def test_chat_teacher_gets_n_texts_from_transformers_serve(served: dict[str, Any]) -> None:
    teacher = OpenAIChatTeacher(
        served["model"], base_url=served["url"] + "/v1", api_key_env=NO_KEY_ENV, max_concurrency=4, timeout_s=60.0
    )
    with teacher:
        results = teacher.continue_prefixes(REQUESTS[:1], SamplingSpec(n=2, max_new_tokens=8, seed=2))
        metrics = teacher.metrics()
    assert results[0].error is None and len(results[0].texts) == 2
    assert metrics["teacher/failed_requests"] == 0 and metrics["teacher/requests"] == 2


@pytest.mark.parametrize("teacher_type", ["openai-completions", "openai-chat"])
def test_omniopd_step_through_a_real_server(served: dict[str, Any], tmp_path: Path, teacher_type: str) -> None:
    """One OmniOPD training step whose teacher is the real server, through the official openai client.
    The student is the served tiny model itself (it has the real SmolLM2 tokenizer)."""
    from omniopd.config import build_config
    from omniopd.training.trainer import train

    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps({"question": f"What is {i} + {i}?", "answer": f"{i}+{i}={2 * i}\n#### {2 * i}"}) for i in range(1, 5)) + "\n")
    out = tmp_path / "run"
    cfg = build_config({
        "output_dir": str(out), "max_steps": 1,
        "student": {"name": served["model"]},
        "teacher": {"type": teacher_type, "model": served["model"], "base_url": served["url"] + "/v1",
                    "api_key_env": NO_KEY_ENV, "cache": False, "max_concurrency": 4, "timeout_s": 60.0,
                    # the tokenizer whose chat template frames the prefix: read by the completion protocol only
                    **({"tokenizer": served["model"]} if teacher_type == "openai-completions" else {})},
        "audit": {"chunk_tokens": 4, "num_chunks": 2, "teacher_samples": 2},
        "rollout": {"samples_per_prompt": 1, "max_new_tokens": 12, "batch_size": 4},
        "optim": {"prompts_per_step": 2, "micro_batch_size": 2, "lr": 1e-3},
        "data": {"train": str(data)},
        "eval": {"before": False, "after": False},
    })
    train(cfg, progress=False)
    [row] = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert row["audit/chunks"] > 0 and row["teacher/failed_chunks"] == 0
    assert row["teacher/total_requests"] >= row["audit/chunks"]  # real HTTP requests (topped up to N)
    audits = [json.loads(x) for x in (out / "audits.jsonl").read_text().splitlines()]
    assert audits[0]["teacher"].startswith(teacher_type)
    assert all(len(c["continuations"]) == 2 for a in audits for c in a["chunks"])

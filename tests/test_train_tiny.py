"""Tier-2: two OmniOPD steps end to end on a tiny random Llama built from a config (no download)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import char_tokenizer, tiny_llama
from omniopd.config import API_TEACHER_TYPES, build_config
from omniopd.training.trainer import train


def _cfg(model_dir, data, out, teacher: dict, **extra):
    data_cfg = {"train": str(data)}
    base = {
        "output_dir": str(out),
        "max_steps": 2,
        "seed": 0,
        "student": {"name": str(model_dir)},
        # batch_size is an in-process teacher's setting; an API teacher type does not take it
        "teacher": dict(teacher) if teacher.get("type") in API_TEACHER_TYPES else {"batch_size": 16, **teacher},
        "audit": {"chunk_tokens": 4, "num_chunks": 2, "teacher_samples": 3},
        "rollout": {"samples_per_prompt": 2, "max_new_tokens": 24, "batch_size": 8},
        "optim": {"lr": 1e-3, "prompts_per_step": 2, "micro_batch_size": 2},
        "data": data_cfg,
        "eval": {"data": str(data), "limit": 2, "max_new_tokens": 8, "before": False, "after": True},
    }
    base.update(extra)
    return build_config(base)


def _params(path):
    from transformers import AutoModelForCausalLM

    return {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(path).state_dict().items()}


@pytest.mark.parametrize("teacher_type", ["local", "privileged"])
def test_two_steps_end_to_end(tiny_model_dir, gsm8k_like, tmp_path, teacher_type):
    out = tmp_path / "run"
    before = _params(tiny_model_dir)
    summary = train(_cfg(tiny_model_dir, gsm8k_like, out, {"type": teacher_type}), progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("audit/k_sem_mean", "audit/k_sem_interior_frac", "audit/target_mean", "audit/chunks_per_traj",
                "loss/chunk", "loss/kl_anchor", "rollout/mean_length", "teacher/tokens", "time/step_s"):
        assert key in rows[0] and all(isinstance(r[key], float) for r in rows), key
    assert all(torch.isfinite(torch.tensor(r["loss/total"])) for r in rows)
    assert sum(r["audit/chunks"] for r in rows) > 0  # the random model's answers are long enough to audit
    assert 0.0 <= rows[0]["audit/target_min"] <= rows[0]["audit/target_max"] <= 1.0
    assert rows[0]["loss/kl_anchor"] == pytest.approx(0.0, abs=1e-6)  # step 1: student == reference
    assert rows[1]["loss/kl_anchor"] > 0.0  # after one update the student has moved
    after = _params(out / "final")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert (out / "config.yaml").is_file() and (out / "eval_after.json").is_file()
    audits = [json.loads(line) for line in (out / "audits.jsonl").read_text().splitlines()]
    assert audits and audits[0]["teacher"].startswith(teacher_type) and audits[0]["phi"] == "ned"
    chunk = next(c for a in audits for c in a["chunks"])
    assert len(chunk["continuations"]) == 3 and len(chunk["phi_scores"]) == 3
    assert chunk["k_sem"] == pytest.approx(sum(chunk["phi_scores"]))
    assert summary["steps"] == 2 and summary["teacher_tokens"] > 0


def test_teacher_with_another_tokenizer(tiny_model_dir, gsm8k_like, tmp_path):
    """A local teacher whose vocabulary differs from the student's: its text is cut to C student tokens."""
    tdir = tmp_path / "teacher"
    tok = char_tokenizer(extra_chars="äöüßé")
    tiny_llama(vocab_size=len(tok), hidden=48, seed=7).save_pretrained(tdir)
    tok.save_pretrained(tdir)
    out = tmp_path / "run"
    train(_cfg(tiny_model_dir, gsm8k_like, out, {"type": "local", "model": str(tdir), "max_new_tokens": 8}), progress=False)
    audits = [json.loads(line) for line in (out / "audits.jsonl").read_text().splitlines()]
    student_tok = char_tokenizer()
    conts = [c for a in audits for ch in a["chunks"] for c in ch["continuations"]]
    assert conts
    assert all(len(student_tok.encode(c, add_special_tokens=False)) <= 4 for c in conts)


def test_existing_run_is_not_overwritten(tiny_model_dir, gsm8k_like, tmp_path):
    from omniopd.errors import OmniOPDError

    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(OmniOPDError, match="already holds a run"):
        train(_cfg(tiny_model_dir, gsm8k_like, out, {"type": "local"}), progress=False)
    assert (out / "metrics.jsonl").read_text() == "{}\n"


def test_constant_k_ablation_asks_no_teacher_and_targets_follow_the_prior(tiny_model_dir, gsm8k_like, tmp_path):
    """audit.constant_k: k_sem is the constant for every chunk, so pi_hat = (k + alpha p_bar) / (N + alpha)
    with N=3, alpha=1, k=1.5; no teacher is built (an unreachable API teacher would fail the run's first check)."""
    out = tmp_path / "run"
    teacher = {"type": "openai-completions", "model": "m", "base_url": "http://127.0.0.1:9/v1", "cache": False}
    audit = {"chunk_tokens": 4, "num_chunks": 2, "teacher_samples": 3, "constant_k": 1.5}
    cfg = _cfg(tiny_model_dir, gsm8k_like, out, teacher, audit=audit, max_steps=1)
    summary = train(cfg, progress=False)
    [row] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert row["audit/chunks"] > 0 and row["audit/k_sem_mean"] == pytest.approx(1.5)
    assert row["teacher/tokens"] == 0 and summary["teacher_tokens"] == 0
    chunks = [c for a in (json.loads(x) for x in (out / "audits.jsonl").read_text().splitlines()) for c in a["chunks"]]
    for c in chunks:
        assert c["continuations"] == [] and c["k_sem"] == pytest.approx(1.5)
        assert c["target"] == pytest.approx((1.5 + 1.0 * c["prior_mean"]) / (3 + 1.0), rel=1e-5)
    from omniopd.methods.omniopd import departures

    assert "no teacher: k_sem = 1.5 for every chunk (ablation)" in departures(cfg)
    with pytest.raises(Exception, match="audit.constant_k: must be <= audit.teacher_samples"):
        _cfg(tiny_model_dir, gsm8k_like, out, teacher, audit={**audit, "constant_k": 4})

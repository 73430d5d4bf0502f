"""check-signal's student-self control: a teacher that is another model than the student is compared
with the student's own continuations of the same prefixes (and the relative score with its shuffled
control)."""

from __future__ import annotations

from conftest import char_tokenizer, tiny_llama
from omniopd.config import build_config
from omniopd.diagnostics.signal_check import _self_verdict, check_signal, format_signal


def test_a_different_teacher_is_compared_with_the_students_own_continuations(tiny_model_dir, gsm8k_like, tmp_path):
    teacher_dir = tmp_path / "other-tiny"
    tok = char_tokenizer()
    tiny_llama(vocab_size=len(tok), seed=1).save_pretrained(teacher_dir)
    tok.save_pretrained(teacher_dir)
    cfg = build_config({
        "output_dir": str(tmp_path / "sig"), "seed": 0, "student": {"name": str(tiny_model_dir)},
        "teacher": {"type": "local", "model": str(teacher_dir), "batch_size": 16},
        "audit": {"chunk_tokens": 4, "num_chunks": 2, "teacher_samples": 3},
        "rollout": {"samples_per_prompt": 2, "max_new_tokens": 16, "batch_size": 8},
        "optim": {"prompts_per_step": 2, "micro_batch_size": 2},
        "data": {"train": str(gsm8k_like)},
    })
    report = check_signal(cfg, steps=1, phis=["ned"])
    assert report["self_teacher"] == f"local:{tiny_model_dir}" and report["control_teacher"] is None
    r = report["phis"]["ned"]
    assert 0.0 <= r["self_k_sem"] <= 3.0
    assert abs(r["teacher_minus_self"] - (r["teacher_k_sem"] - r["self_k_sem"])) < 1e-9  # the same chunks
    assert r["pearson_teacher_self"] is None or -1.0 <= r["pearson_teacher_self"] <= 1.0
    assert "student self" in format_signal(report) and "own continuations" in " ".join(r["verdict"])


def test_the_student_teacher_has_no_self_control(tiny_model_dir, gsm8k_like, tmp_path):
    cfg = build_config({
        "output_dir": str(tmp_path / "sig"), "seed": 0, "student": {"name": str(tiny_model_dir)},
        "teacher": {"type": "privileged", "batch_size": 16},
        "audit": {"chunk_tokens": 4, "num_chunks": 2, "teacher_samples": 3},
        "rollout": {"samples_per_prompt": 2, "max_new_tokens": 16, "batch_size": 8},
        "optim": {"prompts_per_step": 2, "micro_batch_size": 2}, "data": {"train": str(gsm8k_like)},
    })
    report = check_signal(cfg, steps=1, phis=["ned"])
    assert report["self_teacher"] is None and report["phis"]["ned"]["self_k_sem"] is None


def test_self_verdict_by_hand():
    r = {"self_k_sem": 3.9, "teacher_k_sem": 3.5, "teacher_minus_self": -0.4, "pearson_teacher_self": 0.82,
         "relative_minus_shuffled": 0.1, "relative_minus_shuffled_se": 0.1}
    assert "does not point at its own chunk" in _self_verdict("ned", 4, r, True)[0]
    r["relative_minus_shuffled"] = 0.5
    assert "points at its own chunk more" in _self_verdict("ned", 4, r, True)[0]
    assert _self_verdict("ned", 4, r, False) == []

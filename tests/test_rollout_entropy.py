"""Entropy and log-probs recorded while sampling equal the audit's second forward (student_token_stats), and
the anchors and targets chosen from them are the same: on a tiny model, padded batched rows, EOS mid-batch."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import char_tokenizer, tiny_llama
from omniopd.config import build_config
from omniopd.core import ANCHOR_SELECTORS
from omniopd.data import Example
from omniopd.engine.decoding import RawTokenStats
from omniopd.engine.rollout import chat_prompts, sample_rollouts
from omniopd.methods.omniopd.audit import run_audit, student_token_stats
from omniopd.teachers.local import LocalTeacher

QUESTIONS = ["What is 1+1?", "Hi", "Compute 12 times 13, please, and show the steps."]  # three prompt lengths


@pytest.fixture(scope="module")
def tiny():
    tok = char_tokenizer()
    return tiny_llama(vocab_size=len(tok)), tok


def _rollouts(model, tok, seed: int, **kw):
    prompts = chat_prompts(tok, [[{"role": "user", "content": q}] for q in QUESTIONS])
    torch.manual_seed(seed)
    args = {"samples_per_prompt": 2, "max_new_tokens": 30, "temperature": 1.0, "top_p": 1.0, "batch_size": 4, **kw}
    return sample_rollouts(model, tok, prompts, **args)


def test_raw_token_stats_by_hand():
    """H = 1.5 ln 2 for (1/2, 1/4, 1/4); log p of the token fed back next step; the last step from the output."""
    rec = RawTokenStats()
    probs = torch.tensor([[0.5, 0.25, 0.25], [1 / 3, 1 / 3, 1 / 3]])
    scores = probs.log() + 7.0  # logits: softmax is shift invariant
    assert rec(torch.zeros(2, 4, dtype=torch.long), scores) is scores  # the logits pass through untouched
    rec(torch.tensor([[0, 0, 0, 0, 1], [0, 0, 0, 0, 2]]), scores.flip(-1))  # step 0 drew tokens 1 and 2
    ent, logp = rec.result(torch.tensor([[1, 0], [2, 2]]))
    assert ent.shape == logp.shape == (2, 2)
    assert ent[0, 0].item() == pytest.approx(1.5 * math.log(2), abs=1e-6)
    assert ent[1, 0].item() == pytest.approx(math.log(3), abs=1e-6)
    assert logp[:, 0].tolist() == pytest.approx([math.log(0.25), math.log(1 / 3)], abs=1e-6)
    # step 1 had the flipped distribution (1/4, 1/4, 1/2) for row 0: token 0 -> log 1/4
    assert logp[:, 1].tolist() == pytest.approx([math.log(0.25), math.log(1 / 3)], abs=1e-6)


@pytest.mark.parametrize("head_scale", [1.0, 30.0])  # nearly uniform (H ~ log V) and peaked (H ~ 2 nats)
def test_rollout_stats_equal_second_forward_with_eos_mid_batch(head_scale):
    tok = char_tokenizer()
    model = tiny_llama(vocab_size=len(tok))
    with torch.no_grad():
        model.lm_head.weight.mul_(head_scale)
    ro = _rollouts(model, tok, seed=0)
    # the case under test: padded prompts of three lengths, and a row that ended with EOS while others ran on
    assert len(set(ro.batch.attention_mask[:, : ro.batch.prompt_len].sum(1).tolist())) == 3
    assert any(ro.finished) and not all(ro.finished)
    assert min(ro.lengths) < max(ro.lengths)
    ent, logp = student_token_stats(model, ro.batch, micro_batch_size=3, slice_size=7)
    assert ro.entropy.shape == ro.logprobs.shape == ro.batch.response_ids.shape
    assert torch.allclose(ro.entropy, ent, atol=1e-5, rtol=0)
    assert torch.allclose(ro.logprobs, logp, atol=1e-5, rtol=0)
    assert (ro.entropy[~ro.batch.response_mask] == 0).all() and (ro.entropy[ro.batch.response_mask] > 0).all()
    select = ANCHOR_SELECTORS["peak_entropy"]
    for b, L in enumerate(ro.lengths):
        ours = select(ro.entropy[b].tolist(), L, 4, 3, None)
        theirs = select(ent[b].tolist(), L, 4, 3, None)
        assert ours == theirs
        assert ours or L < 4


def test_rollout_stats_are_of_the_unmodified_distribution(tiny):
    """At temperature 0.7 and top_p 0.9 the recorded entropy is still that of the raw logits (temperature 1,
    full vocabulary), as the second forward computes it."""
    model, tok = tiny
    ro = _rollouts(model, tok, seed=1, temperature=0.7, top_p=0.9)
    ent, logp = student_token_stats(model, ro.batch, micro_batch_size=6, slice_size=128)
    assert torch.allclose(ro.entropy, ent, atol=1e-5, rtol=0)
    assert torch.allclose(ro.logprobs, logp, atol=1e-5, rtol=0)


def test_audit_from_rollout_stats_matches_second_forward(tiny):
    model, tok = tiny
    ro = _rollouts(model, tok, seed=3)
    teacher = LocalTeacher(model, tok, "tiny", privileged=False, batch_size=8)
    examples = [Example(id=str(i), question=QUESTIONS[i], answer="", reference="") for i in ro.example_index]
    cfg = build_config({"audit": {"chunk_tokens": 4, "num_chunks": 3, "teacher_samples": 2}})
    common = dict(step=1, model=model, tokenizer=tok, batch=ro.batch, lengths=ro.lengths, examples=examples,
                  teacher=teacher, audit_cfg=cfg.audit, teacher_cfg=cfg.teacher, seed=0, micro_batch_size=4,
                  slice_size=16)
    forward = run_audit(**common)
    recorded = run_audit(**common, token_stats=(ro.entropy, ro.logprobs))
    assert recorded.starts_B == forward.starts_B and sum(map(len, forward.starts_B)) > 0
    for a, b in zip(recorded.targets_B, forward.targets_B, strict=True):
        assert a == pytest.approx(b, abs=1e-5)
    assert recorded.metrics["audit/entropy_from_rollout"] == 1.0 and forward.metrics["audit/entropy_from_rollout"] == 0.0


def test_checkpoint_processors_fall_back_to_the_second_forward(caplog, monkeypatch):
    """A checkpoint whose generation config adds a processor ahead of the sampling warpers (transformers applies
    its repetition_penalty even with our own config): the rollout records nothing, and says so."""
    import omniopd.engine.rollout

    monkeypatch.setattr(omniopd.engine.rollout, "_warned", set())  # said once per process: another test may have said it
    tok = char_tokenizer()
    model = tiny_llama(vocab_size=len(tok))
    model.generation_config.repetition_penalty = 1.3
    with caplog.at_level("WARNING"):
        ro = _rollouts(model, tok, seed=0)
    assert ro.entropy is None and ro.logprobs is None
    assert "repetition_penalty" in caplog.text

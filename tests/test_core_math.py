"""Tier-1 tests of the method's math, each against hand-computed values."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from omniopd.core import (
    LossInputs,
    chunk_prior_mean,
    dm_target,
    k_sem,
    ned,
    rouge1,
    select_peak_entropy,
    token_stats,
    token_weights_from_chunks,
)
from omniopd.core.losses import omniopd_loss
from omniopd.core.scheduler import select_random, select_uniform

# ---------------------------------------------------------------- scheduler


def test_scheduler_takes_peaks_greedily_without_overlap():
    H = [0.1, 5.0, 4.9, 0.2, 0.3, 3.0, 0.0, 0.0, 0.0, 0.0]
    # C=2: candidates 0..8. Best is t=1; t=2 is within 2 tokens of 1 -> skipped; t=5 next; then t=4
    # is within 2 of 5, t=3 (0.2) is 2 away from 1 and 5 -> accepted as third.
    assert select_peak_entropy(H, 10, chunk_tokens=2, num_chunks=3) == [1, 3, 5]


def test_scheduler_ties_go_to_the_later_position():
    H = [1.0] * 8
    assert select_peak_entropy(H, 8, chunk_tokens=3, num_chunks=1) == [5]  # last legal start is 8 - 3
    assert select_peak_entropy(H, 8, chunk_tokens=3, num_chunks=2) == [2, 5]


def test_scheduler_never_runs_past_the_response():
    H = [0.0] * 6 + [9.0, 9.0]  # peaks in the last two tokens cannot start a 4-token chunk
    starts = select_peak_entropy(H, 8, chunk_tokens=4, num_chunks=5)
    assert all(s + 4 <= 8 for s in starts)
    assert starts == [0, 4]


def test_scheduler_returns_fewer_than_m_when_fewer_fit_and_none_for_short_responses():
    assert len(select_peak_entropy([1.0] * 10, 10, chunk_tokens=4, num_chunks=10)) == 2
    assert select_peak_entropy([1.0] * 3, 3, chunk_tokens=4, num_chunks=10) == []
    # padding beyond `length` is ignored even when it has high entropy
    assert select_peak_entropy([0.0, 0.0, 0.0, 9.0, 9.0], 3, chunk_tokens=2, num_chunks=1) == [1]


def test_scheduler_entropy_index_is_the_chunk_start_token():
    # H_t scores the distribution that produced y_t, and a chunk starting at t covers y_t..y_{t+C-1}:
    # the peak at t=3 starts the chunk at 3, not at 2 or 4.
    H = [0.0, 0.0, 0.0, 7.0, 0.0, 0.0, 0.0, 0.0]
    assert select_peak_entropy(H, 8, chunk_tokens=2, num_chunks=1) == [3]


def test_ablation_selectors_respect_the_same_rules():
    rng = random.Random(0)
    for length in range(0, 40):
        for sel in (select_random, select_uniform):
            starts = sel([0.0] * length, length, 5, 4, rng)
            assert len(starts) <= 4
            assert all(0 <= s and s + 5 <= length for s in starts)
            assert all(b - a >= 5 for a, b in zip(starts, starts[1:]))
    assert select_uniform([0.0] * 20, 20, 5, 4) == [0, 5, 10, 15]


# ---------------------------------------------------------------- phi


def test_ned_identity_disjoint_empty_and_worked_example():
    assert ned("abc", "abc") == 1.0
    assert ned("abc", "xyz") == 0.0
    assert ned("", "") == 1.0
    assert ned("", " ") == 0.0 and ned("a", "") == 0.0
    # kitten -> sitting: Levenshtein 3, max length 7
    assert ned("kitten", "sitting") == pytest.approx(1 - 3 / 7)


def test_ned_caps_texts_at_4000_characters():
    a = "x" * 4000 + "a" * 1000
    b = "x" * 4000 + "b" * 1000
    assert ned(a, b) == 1.0


def test_rouge1_worked_example_and_edges():
    # a: the cat sat (3), b: the cat ran away (4); overlap 2 -> P=2/4, R=2/3, F1 = 2*.5*.667/(1.167) = 4/7
    assert rouge1("The cat sat.", "the cat ran away") == pytest.approx(4 / 7)
    assert rouge1("", "") == 1.0 and rouge1("a", "") == 0.0
    assert rouge1("x y", "x y") == 1.0 and rouge1("x", "y") == 0.0


def test_k_sem_is_the_sum_of_phi():
    k, scores = k_sem("kitten", ["kitten", "sitting", ""], ned)
    assert scores == pytest.approx([1.0, 1 - 3 / 7, 0.0])
    assert k == pytest.approx(2 - 3 / 7)


# ---------------------------------------------------------------- target


def test_target_hand_computed_and_detached():
    k = torch.tensor([3.0, 0.0], requires_grad=True)
    p = torch.tensor([0.5, 0.2], requires_grad=True)
    t = dm_target(k, p, num_samples=4, prior_strength=1.0)
    assert t.tolist() == pytest.approx([(3 + 0.5) / 5, 0.2 / 5])
    assert not t.requires_grad


def test_target_limits_of_prior_strength():
    k, p = torch.tensor([1.0, 4.0]), torch.tensor([0.9, 0.1])
    assert dm_target(k, p, 4, 0.0).tolist() == pytest.approx([0.25, 1.0])  # alpha=0: k/N
    assert dm_target(k, p, 4, 1e9).tolist() == pytest.approx([0.9, 0.1], abs=1e-6)  # alpha->inf: p_bar


def test_target_out_of_bounds_is_a_bug_not_a_clamp():
    with pytest.raises(RuntimeError):
        dm_target(torch.tensor([5.0]), torch.tensor([0.5]), num_samples=4, prior_strength=0.0)


def test_prior_mean_is_geometric_mean_probability():
    lp = torch.log(torch.tensor([[0.5, 0.125]]))
    assert chunk_prior_mean(lp).item() == pytest.approx(0.25)


# ---------------------------------------------------------------- token stats: entropy and KL


def _head(W):
    return lambda h: h @ W.T


def test_entropy_sliced_equals_direct():
    torch.manual_seed(0)
    h, W = torch.randn(2, 7, 5), torch.randn(11, 5)
    labels = torch.randint(0, 11, (2, 7))
    stats = token_stats(h, _head(W), labels, want_entropy=True, slice_size=3)
    logp = F.log_softmax(h @ W.T, -1)
    assert torch.allclose(stats.entropy, -(logp.exp() * logp).sum(-1), atol=1e-6)
    assert torch.allclose(stats.logprobs, logp.gather(-1, labels[..., None]).squeeze(-1), atol=1e-6)
    assert stats.entropy.dtype == torch.float32


def test_entropy_is_fp32_for_half_precision_models():
    h, W = torch.randn(1, 4, 8).bfloat16(), torch.randn(16, 8).bfloat16()
    stats = token_stats(h, _head(W), torch.zeros(1, 4, dtype=torch.long), want_entropy=True)
    assert stats.entropy.dtype == torch.float32 and stats.logprobs.dtype == torch.float32


def test_kl_is_zero_for_identical_models():
    torch.manual_seed(1)
    h, W = torch.randn(2, 5, 4), torch.randn(9, 4)
    stats = token_stats(h, _head(W), torch.zeros(2, 5, dtype=torch.long), ref_hidden=h.clone(), ref_head=_head(W))
    assert torch.allclose(stats.kl_ref_to_student, torch.zeros(2, 5), atol=1e-6)


def test_kl_two_token_closed_form():
    # vocabulary of 2: p_ref = (0.8, 0.2), p = (0.5, 0.5); KL = .8 ln(.8/.5) + .2 ln(.2/.5)
    W = torch.eye(2)
    ref_h = torch.log(torch.tensor([[[0.8, 0.2]]]))
    h = torch.zeros(1, 1, 2)
    stats = token_stats(h, _head(W), torch.zeros(1, 1, dtype=torch.long), ref_hidden=ref_h)
    expected = 0.8 * math.log(0.8 / 0.5) + 0.2 * math.log(0.2 / 0.5)
    assert stats.kl_ref_to_student.item() == pytest.approx(expected, rel=1e-5)


def test_kl_sliced_with_checkpoint_equals_unsliced_values_and_gradients():
    torch.manual_seed(2)
    W = torch.randn(13, 6)
    ref_h = torch.randn(2, 9, 6)
    labels = torch.randint(0, 13, (2, 9))
    grads = []
    for slice_size, ckpt in ((100, False), (4, True)):
        h = torch.randn(2, 9, 6, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
        s = token_stats(h, _head(W), labels, ref_hidden=ref_h, slice_size=slice_size, use_checkpoint=ckpt)
        (s.kl_ref_to_student.sum() - s.logprobs.sum()).backward()
        grads.append((s.kl_ref_to_student.detach(), h.grad.clone()))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-6)
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-6)


def test_no_gradient_reaches_the_reference():
    W = torch.randn(5, 3)
    ref_h = torch.randn(1, 4, 3, requires_grad=True)
    h = torch.randn(1, 4, 3, requires_grad=True)
    s = token_stats(h, _head(W), torch.zeros(1, 4, dtype=torch.long), ref_hidden=ref_h)
    s.kl_ref_to_student.sum().backward()
    assert ref_h.grad is None and h.grad is not None


# ---------------------------------------------------------------- loss


def _loss_inputs(logp, kl, rmask, starts, targets, C):
    w, m = token_weights_from_chunks(starts, targets, C, logp.shape[1])
    return LossInputs(logprobs=logp, kl=kl, response_mask=rmask, ce_weights=w, ce_mask=m)


def test_loss_hand_computed():
    logp = torch.tensor([[-1.0, -2.0, -3.0, -4.0]], requires_grad=True)
    kl = torch.tensor([[0.5, 0.5, 0.25, 9.0]], requires_grad=True)
    rmask = torch.tensor([[True, True, True, False]])  # last position is padding
    out = omniopd_loss(_loss_inputs(logp, kl, rmask, [[0]], [[0.5]], C=2), normalizer=2.0, kl_anchor_coef=0.1)
    # chunk covers t=0,1 with weight .5: -.5*(-1-2) = 1.5; unaudited real token t=2: .1 * .25; / 2
    assert out.loss.item() == pytest.approx((1.5 + 0.025) / 2)
    out.loss.backward()
    assert logp.grad.tolist() == [[-0.25, -0.25, 0.0, 0.0]]  # only audited tokens, scaled by pi_hat / normalizer
    assert kl.grad[0].tolist() == pytest.approx([0.0, 0.0, 0.05, 0.0])  # only unaudited real tokens
    assert out.metrics["loss/kl_anchor"] == pytest.approx(0.25)


def test_loss_ignores_minus_inf_on_padding():
    logp = torch.tensor([[-1.0, float("-inf")]], requires_grad=True)
    kl = torch.tensor([[0.1, float("nan")]], requires_grad=True)
    out = omniopd_loss(_loss_inputs(logp, kl, torch.tensor([[True, False]]), [[]], [[]], C=1), 1.0, kl_anchor_coef=0.1)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(logp.grad).all() and torch.isfinite(kl.grad).all()


def test_audit_free_batch_still_backpropagates_through_the_kl():
    logp = torch.zeros(1, 3, requires_grad=True)
    kl = torch.ones(1, 3, requires_grad=True)
    out = omniopd_loss(_loss_inputs(logp, kl, torch.ones(1, 3, dtype=torch.bool), [[]], [[]], C=2), 1.0, kl_anchor_coef=0.1)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(0.3)
    assert kl.grad.abs().sum() > 0 and logp.grad.abs().sum() == 0


def test_all_masked_batch_gives_a_finite_zero_gradient():
    logp = torch.randn(2, 3, requires_grad=True)
    kl = torch.rand(2, 3, requires_grad=True)
    out = omniopd_loss(_loss_inputs(logp, kl, torch.zeros(2, 3, dtype=torch.bool), [[], []], [[], []], C=2), 2.0, kl_anchor_coef=0.1)
    out.loss.backward()
    assert out.loss.item() == 0.0 and logp.grad.abs().sum() == 0 and kl.grad.abs().sum() == 0


def test_target_weight_does_not_carry_gradient():
    w = torch.tensor([[0.5, 0.5]], requires_grad=True)
    logp = torch.tensor([[-1.0, -1.0]], requires_grad=True)
    inputs = LossInputs(
        logprobs=logp, kl=torch.zeros(1, 2), response_mask=torch.ones(1, 2, dtype=torch.bool), ce_weights=w,
        ce_mask=torch.ones(1, 2, dtype=torch.bool),
    )
    omniopd_loss(inputs, 1.0, kl_anchor_coef=0.1).loss.backward()
    assert w.grad is None


def test_micro_batches_sum_to_the_full_batch_loss():
    torch.manual_seed(4)
    logp, kl = torch.randn(4, 6), torch.rand(4, 6)
    rmask = torch.ones(4, 6, dtype=torch.bool)
    starts, targets = [[0], [2], [], [3]], [[0.3], [0.7], [], [0.1]]
    full = omniopd_loss(_loss_inputs(logp, kl, rmask, starts, targets, 3), 4.0, kl_anchor_coef=0.1).loss
    halves = sum(
        omniopd_loss(_loss_inputs(logp[i : i + 2], kl[i : i + 2], rmask[i : i + 2], starts[i : i + 2], targets[i : i + 2], 3), 4.0, kl_anchor_coef=0.1).loss
        for i in (0, 2)
    )
    assert full.item() == pytest.approx(halves.item())


def test_chunk_weights_reject_overlap_and_overrun():
    with pytest.raises(ValueError):
        token_weights_from_chunks([[0, 1]], [[0.1, 0.2]], 2, 5)
    with pytest.raises(ValueError):
        token_weights_from_chunks([[4]], [[0.1]], 2, 5)

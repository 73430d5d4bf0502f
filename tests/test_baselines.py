"""Tier-1 tests of the baseline losses (SFT, OPD, GRPO) and the centred target, against exact values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_llama
from omniopd.core.advantages import group_advantages
from omniopd.core.losses import LOSSES, LossInputs, get_loss, grpo_loss, opd_full_loss, opd_sampled_loss, sft_loss
from omniopd.core.target import centered_targets
from omniopd.core.token_stats import reverse_kl_sliced, token_stats


# every loss takes one LossInputs; these build the ones each baseline fills
def SFTLossInputs(student_logprobs, target_mask):
    return LossInputs(logprobs=student_logprobs, response_mask=target_mask, ce_mask=target_mask)


def OPDSampledInputs(student_logprobs, teacher_logprobs, response_mask):
    # the advantage log q - log p, detached (the method computes it from the teacher's scores)
    adv = teacher_logprobs.detach() - student_logprobs.detach()
    return LossInputs(logprobs=student_logprobs, response_mask=response_mask, advantages=adv)


def OPDFullInputs(reverse_kl, response_mask):
    return LossInputs(response_mask=response_mask, kl=reverse_kl)


def GRPOInputs(student_logprobs, old_logprobs, advantages, response_mask, ref_kl=None):
    return LossInputs(
        logprobs=student_logprobs, response_mask=response_mask, advantages=advantages, old_logprobs=old_logprobs,
        kl=ref_kl,
    )


def test_every_loss_is_registered_once_by_name():
    assert sorted(LOSSES) == ["grpo", "omniopd", "opd_full", "opd_sampled", "sft"]
    assert get_loss("sft").fn is sft_loss and get_loss("grpo").fn is grpo_loss
    with pytest.raises(KeyError, match="unknown loss 'nope': registered are grpo, omniopd"):
        get_loss("nope")
    with pytest.raises(ValueError, match="loss 'opd_sampled' needs LossInputs.advantages"):
        opd_sampled_loss(LossInputs(logprobs=torch.zeros(1, 1), response_mask=torch.ones(1, 1, dtype=torch.bool)), 1.0)


def test_finish_turns_micro_batch_sums_into_the_logged_metrics():
    # two micro-batches of SFT: nll 3 over 2 tokens and 1 over 2 tokens; normaliser 4 sequences
    mask = torch.ones(1, 2, dtype=torch.bool)
    outs = [sft_loss(SFTLossInputs(torch.tensor([[-1.0, -2.0]]), mask), 4.0),
            sft_loss(SFTLossInputs(torch.tensor([[-0.5, -0.5]]), mask), 4.0)]
    sums = {k: sum(o.sums[k] for o in outs) for k in outs[0].sums}
    m = get_loss("sft").finish(sums, 4.0)
    assert m["loss/sft"] == pytest.approx(4.0 / 4) and m["loss/total"] == m["loss/sft"]
    assert m["sft/nll_per_token"] == pytest.approx(4.0 / 4) and m["sft/target_tokens"] == 4.0


def _identity_head(h):
    return h  # hidden states *are* the logits: lets a test pick the distributions directly


def _head(W):
    return lambda h: h @ W.T


# ---------------------------------------------------------------- OPD: reverse KL from hidden states


def test_reverse_kl_two_token_closed_form():
    # p = (0.5, 0.5) student, q = (0.8, 0.2) teacher: KL(p || q) = .5 ln(.5/.8) + .5 ln(.5/.2)
    h = torch.zeros(1, 1, 2)
    teacher_h = torch.log(torch.tensor([[[0.8, 0.2]]]))
    kl = reverse_kl_sliced(h, _identity_head, teacher_h, _identity_head)
    expected = 0.5 * math.log(0.5 / 0.8) + 0.5 * math.log(0.5 / 0.2)
    assert kl.shape == (1, 1) and kl.dtype == torch.float32
    assert kl.item() == pytest.approx(expected, rel=1e-6)


def test_reverse_kl_sliced_with_checkpoint_equals_direct_values_and_gradients():
    torch.manual_seed(2)
    W, W_T = torch.randn(13, 6), torch.randn(13, 4)  # teacher of another width, same vocabulary
    teacher_h = torch.randn(2, 9, 4)
    h0 = torch.randn(2, 9, 6)
    logp, logq = F.log_softmax(h0 @ W.T, -1), F.log_softmax(teacher_h @ W_T.T, -1)
    direct = (logp.exp() * (logp - logq)).sum(-1)
    grads = []
    for slice_size, ckpt in ((100, False), (4, True)):
        h = h0.clone().requires_grad_(True)
        kl = reverse_kl_sliced(h, _head(W), teacher_h, _head(W_T), slice_size=slice_size, use_checkpoint=ckpt)
        kl.sum().backward()
        assert torch.allclose(kl.detach(), direct, atol=1e-6)
        grads.append(h.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_no_gradient_reaches_the_teacher():
    W = torch.randn(5, 3, requires_grad=True)
    W_T = torch.randn(5, 3, requires_grad=True)
    teacher_h = torch.randn(1, 4, 3, requires_grad=True)
    h = torch.randn(1, 4, 3, requires_grad=True)
    reverse_kl_sliced(h, _head(W), teacher_h, _head(W_T), slice_size=2).sum().backward()
    assert teacher_h.grad is None and W_T.grad is None
    assert h.grad is not None and W.grad is not None


def test_reverse_kl_rejects_a_different_vocabulary():
    with pytest.raises(ValueError, match="vocabulary"):
        reverse_kl_sliced(torch.zeros(1, 2, 3), _identity_head, torch.zeros(1, 2, 4), _identity_head)


# ---------------------------------------------------------------- OPD: identical teacher and student


def _tiny_pair_and_batch():
    student, teacher = tiny_llama(vocab_size=40, seed=0), tiny_llama(vocab_size=40, seed=0)  # same weights
    for p in teacher.parameters():
        p.requires_grad_(False)
    ids = torch.randint(3, 40, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, 6:] = False  # row 1: two padded response positions
    return student, teacher, ids, mask


def test_opd_full_is_zero_with_zero_gradient_when_teacher_is_the_student():
    student, teacher, ids, mask = _tiny_pair_and_batch()
    h = student.get_decoder()(ids).last_hidden_state[:, :-1]  # [:, t] predicts ids[:, t + 1]
    with torch.no_grad():
        teacher_h = teacher.get_decoder()(ids).last_hidden_state[:, :-1]
    kl = reverse_kl_sliced(h, student.get_output_embeddings(), teacher_h, teacher.get_output_embeddings(), slice_size=3)
    out = opd_full_loss(OPDFullInputs(reverse_kl=kl, response_mask=mask), normalizer=2.0)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(0.0, abs=1e-6)
    assert out.metrics["opd/reverse_kl_mean"] == pytest.approx(0.0, abs=1e-6)
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and max(g.abs().max().item() for g in grads) < 1e-6
    assert all(p.grad is None for p in teacher.parameters())


def test_opd_sampled_is_zero_with_zero_gradient_when_teacher_is_the_student():
    student, teacher, ids, mask = _tiny_pair_and_batch()
    labels = ids[:, 1:]
    logp = token_stats(student.get_decoder()(ids).last_hidden_state[:, :-1], student.get_output_embeddings(), labels).logprobs
    with torch.no_grad():
        logq = token_stats(teacher.get_decoder()(ids).last_hidden_state[:, :-1], teacher.get_output_embeddings(), labels).logprobs
    assert torch.equal(logp.detach(), logq)  # same weights, same ops: advantage exactly 0
    out = opd_sampled_loss(OPDSampledInputs(student_logprobs=logp, teacher_logprobs=logq, response_mask=mask), 2.0)
    out.loss.backward()
    assert out.loss.item() == 0.0 and out.metrics["opd/reverse_kl_mean"] == 0.0
    assert all(p.grad.abs().max().item() == 0.0 for p in student.parameters() if p.grad is not None)


def test_opd_sampled_and_full_estimators_agree_in_expectation():
    # One position, vocabulary 5, student logits theta, teacher logits fixed. For y ~ p_theta and the
    # detached advantage A(y) = log q(y) - log p(y):
    #   E_y[∇(-A(y) log p(y))] = sum_y p(y) (log p(y) - log q(y)) ∇log p(y)
    #                          = sum_y ∇p(y) (log p(y) - log q(y))
    #                          = ∇KL(p || q) - sum_y p(y) ∇log p(y) = ∇KL(p || q),
    # since sum_y p ∇log p = ∇ sum_y p = ∇1 = 0. The Monte Carlo mean of n i.i.d. per-sample gradients
    # has standard error s / sqrt(n) per component (s the sample std); by the CLT a deviation beyond
    # 5 standard errors has probability ~6e-7 per component, so 5 SE is the tolerance.
    torch.manual_seed(0)
    theta = torch.tensor([0.5, -1.0, 1.5, 0.0, -0.3])
    teacher = torch.tensor([[[-0.5, 1.0, 0.2, 0.7, -1.5]]])  # (1, 1, 5) teacher logits

    exact_theta = theta.clone().requires_grad_(True)
    kl = reverse_kl_sliced(exact_theta.view(1, 1, 5), _identity_head, teacher, _identity_head)
    opd_full_loss(OPDFullInputs(kl, torch.ones(1, 1, dtype=torch.bool)), 1.0).loss.backward()
    exact = exact_theta.grad

    n = 20_000
    y = torch.distributions.Categorical(logits=theta).sample((n,))  # (n,)
    # One leaf row per sample, so autograd yields each sample's gradient (scaled by 1/normalizer).
    theta_n = theta.repeat(n, 1).requires_grad_(True)  # (n, 5)
    logp = F.log_softmax(theta_n, -1).gather(-1, y[:, None])  # (n, 1): B = n sequences of T = 1
    logq = F.log_softmax(teacher.view(1, 5), -1).expand(n, 5).gather(-1, y[:, None])
    out = opd_sampled_loss(OPDSampledInputs(logp, logq, torch.ones(n, 1, dtype=torch.bool)), normalizer=n)
    out.loss.backward()
    per_sample = theta_n.grad * n  # (n, 5)
    mc_mean, se = per_sample.mean(0), per_sample.std(0) / math.sqrt(n)
    assert torch.allclose(theta_n.grad.sum(0), mc_mean, atol=1e-6)  # the loss's gradient is the MC mean
    assert exact.norm() > 20 * se.norm()  # the comparison is not vacuous
    assert ((mc_mean - exact).abs() <= 5 * se).all(), (mc_mean, exact, se)
    # the logged mean of log p - log q is the single-sample (k1) estimate of KL(p || q): same 5-SE rule
    k1 = (logp - logq).detach().squeeze(-1)
    assert abs(out.metrics["opd/reverse_kl_mean"] - kl.item()) <= 5 * k1.std().item() / math.sqrt(n)


def test_opd_losses_hand_computed_and_masked():
    logp = torch.tensor([[-1.0, -2.0, float("-inf")]], requires_grad=True)
    logq = torch.tensor([[-0.5, -3.0, float("-inf")]])
    mask = torch.tensor([[True, True, False]])
    out = opd_sampled_loss(OPDSampledInputs(logp, logq, mask), normalizer=2.0)
    # A = (0.5, -1.0); loss = -(0.5 * -1 + -1 * -2) / 2 = -0.75; d/dlogp = -A / 2
    assert out.loss.item() == pytest.approx(-0.75)
    out.loss.backward()
    assert logp.grad.tolist() == [[-0.25, 0.5, 0.0]]
    assert out.metrics["opd/reverse_kl_mean"] == pytest.approx((-0.5 + 1.0) / 2)

    kl = torch.tensor([[0.2, 0.4, float("nan")]], requires_grad=True)
    full = opd_full_loss(OPDFullInputs(kl, mask), normalizer=2.0)
    full.loss.backward()
    assert full.loss.item() == pytest.approx(0.3) and full.metrics["opd/reverse_kl_mean"] == pytest.approx(0.3)
    assert kl.grad.tolist() == [[0.5, 0.5, 0.0]]


# ---------------------------------------------------------------- GRPO


def test_group_advantages_exactly_zero_for_equal_rewards_and_hand_computed_otherwise():
    rewards = torch.tensor([0.1, 0.1, 0.1, 1.0, 0.0, 1.0])
    adv = group_advantages(rewards, group_size=3)
    assert adv[:3].tolist() == [0.0, 0.0, 0.0]  # exactly, not a rounding residue of mean(0.1, 0.1, 0.1)
    # group 2: mean 2/3, centred (1/3, -2/3, 1/3), unbiased std sqrt((1/9 + 4/9 + 1/9) / 2) = sqrt(1/3)
    s = math.sqrt(1 / 3) + 1e-6
    assert adv[3:].tolist() == pytest.approx([(1 / 3) / s, (-2 / 3) / s, (1 / 3) / s], rel=1e-6)
    raw = group_advantages(rewards, group_size=3, normalize_std=False)
    assert raw.tolist() == pytest.approx([0, 0, 0, 1 / 3, -2 / 3, 1 / 3], abs=1e-7) and raw[:3].abs().sum() == 0
    assert group_advantages(torch.tensor([1.0, 0.0]), group_size=1).tolist() == [0.0, 0.0]
    with pytest.raises(ValueError):
        group_advantages(torch.ones(5), group_size=2)


def test_grpo_step_raises_the_rewarded_sample_and_lowers_the_other():
    # A one-position policy over 4 tokens; two on-policy samples y=0 (reward 1) and y=2 (reward 0).
    theta = torch.tensor([0.2, 0.1, -0.3, 0.0], requires_grad=True)
    y = torch.tensor([[0], [2]])
    adv = group_advantages(torch.tensor([1.0, 0.0]), group_size=2)
    assert adv[0] > 0 > adv[1]

    def logp_of_samples():
        return F.log_softmax(theta, -1).expand(2, 4).gather(-1, y)  # (2, 1)

    logp = logp_of_samples()
    inputs = GRPOInputs(logp, logp.detach(), adv, torch.ones(2, 1, dtype=torch.bool))
    out = grpo_loss(inputs, normalizer=2.0)
    out.loss.backward()
    # on-policy: ratio 1, gradient -(sum_i A_i ∇log p(y_i)) / 2 with ∇_theta log p(y) = e_y - p
    p = F.softmax(theta.detach(), -1)
    expected = -(adv[0] * (F.one_hot(torch.tensor(0), 4) - p) + adv[1] * (F.one_hot(torch.tensor(2), 4) - p)) / 2
    assert torch.allclose(theta.grad, expected, atol=1e-6)
    assert out.metrics["grpo/clip_frac"] == 0.0 and out.metrics["grpo/adv_mean"] == pytest.approx(0.0, abs=1e-6)
    before = logp.detach().squeeze(-1)
    with torch.no_grad():
        theta -= 0.5 * theta.grad  # one SGD step
    after = logp_of_samples().squeeze(-1)
    assert after[0] > before[0] and after[1] < before[1]


def test_grpo_clips_on_a_hand_made_ratio():
    old = torch.log(torch.tensor([[0.4], [0.4], [0.4], [0.4]]))
    ratios = torch.tensor([[1.5], [1.5], [0.5], [0.5]])
    logp = (old + ratios.log()).requires_grad_(True)
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0])
    out = grpo_loss(GRPOInputs(logp, old, adv, torch.ones(4, 1, dtype=torch.bool)), normalizer=4.0, clip_eps=0.2)
    # per token -min(r A, clip(r, .8, 1.2) A):
    #   r=1.5, A=+1: -min(1.5, 1.2) = -1.2  clipped, no gradient
    #   r=1.5, A=-1: -min(-1.5, -1.2) = 1.5  unclipped, d/dlogp = -A r = 1.5
    #   r=0.5, A=-1: -min(-0.5, -0.8) = 0.8  clipped, no gradient
    #   r=0.5, A=+1: -min(0.5, 0.8) = -0.5   unclipped, d/dlogp = -A r = -0.5
    assert out.loss.item() == pytest.approx((-1.2 + 1.5 + 0.8 - 0.5) / 4)
    out.loss.backward()
    assert logp.grad.squeeze(-1).tolist() == pytest.approx([0.0, 1.5 / 4, 0.0, -0.5 / 4], abs=1e-6)
    assert out.metrics["grpo/clip_frac"] == 0.5


def test_grpo_reference_kl_padding_and_validation():
    logp = torch.tensor([[-1.0, float("-inf")]], requires_grad=True)
    old = torch.tensor([[-1.0, -2.0]])
    ref_kl = torch.tensor([[0.3, float("nan")]], requires_grad=True)
    mask = torch.tensor([[True, False]])
    out = grpo_loss(GRPOInputs(logp, old, torch.tensor([2.0]), mask, ref_kl=ref_kl), 1.0, kl_coef=0.5)
    # -(1 * 2) + 0.5 * 0.3 on the one real token; padding contributes nothing and no NaN
    assert out.loss.item() == pytest.approx(-2.0 + 0.15)
    out.loss.backward()
    assert logp.grad.tolist() == [[-2.0, 0.0]] and ref_kl.grad.tolist() == [[0.5, 0.0]]
    assert out.metrics["grpo/ref_kl_mean"] == pytest.approx(0.3)
    with pytest.raises(ValueError, match="kl_coef > 0 needs LossInputs.kl"):
        grpo_loss(GRPOInputs(logp, old, torch.tensor([2.0]), mask), 1.0, kl_coef=0.1)


# ---------------------------------------------------------------- SFT


def test_sft_token_mean_equals_hugging_face_causal_lm_loss():
    model = tiny_llama(vocab_size=48, seed=3)
    ids = torch.randint(3, 48, (2, 12), generator=torch.Generator().manual_seed(1))
    prompt_lens = (4, 7)
    labels = ids.clone()
    for b, P in enumerate(prompt_lens):
        labels[b, :P] = -100  # prompt tokens are not targets
    hf = model(input_ids=ids, labels=labels).loss

    # Shift by one: the hidden state at position p predicts the token at p + 1.
    hidden = model.get_decoder()(ids).last_hidden_state[:, :-1]
    logp = token_stats(hidden, model.get_output_embeddings(), ids[:, 1:], slice_size=5).logprobs
    target_mask = labels[:, 1:] != -100
    ours = sft_loss(SFTLossInputs(student_logprobs=logp, target_mask=target_mask), normalizer=2.0, token_mean=True)
    assert ours.loss.item() == pytest.approx(hf.item(), rel=1e-5)
    n_target = (12 - 4) + (12 - 7)
    assert ours.metrics["tokens/target"] == n_target
    # the default aggregation: the same sum over the constant normalizer (2 sequences)
    summed = sft_loss(SFTLossInputs(logp, target_mask), normalizer=2.0)
    assert summed.loss.item() == pytest.approx(hf.item() * n_target / 2, rel=1e-5)


def test_sft_masks_prompt_and_padding_and_all_masked_is_finite_zero():
    logp = torch.tensor([[-9.0, -1.0, -2.0, float("-inf")]], requires_grad=True)
    mask = torch.tensor([[False, True, True, False]])  # prompt token, two targets, padding
    out = sft_loss(SFTLossInputs(logp, mask), normalizer=2.0)
    assert out.loss.item() == pytest.approx(1.5)
    out.loss.backward()
    assert logp.grad.tolist() == [[0.0, -0.5, -0.5, 0.0]]
    none = torch.randn(2, 3, requires_grad=True)
    for token_mean in (False, True):
        z = sft_loss(SFTLossInputs(none, torch.zeros(2, 3, dtype=torch.bool)), 2.0, token_mean=token_mean)
        z.loss.backward()
        assert z.loss.item() == 0.0 and none.grad.abs().sum() == 0


def test_micro_batches_sum_to_the_full_batch_loss_for_constant_normalizers():
    torch.manual_seed(4)
    logp, logq, kl = torch.randn(4, 6), torch.randn(4, 6), torch.rand(4, 6)
    mask = torch.rand(4, 6) > 0.3
    adv = torch.randn(4)
    losses = {
        "sft": lambda s: sft_loss(SFTLossInputs(logp[s], mask[s]), 4.0),
        "opd_sampled": lambda s: opd_sampled_loss(OPDSampledInputs(logp[s], logq[s], mask[s]), 4.0),
        "opd_full": lambda s: opd_full_loss(OPDFullInputs(kl[s], mask[s]), 4.0),
        "grpo": lambda s: grpo_loss(GRPOInputs(logp[s], logq[s], adv[s], mask[s], kl[s]), 4.0, kl_coef=0.1),
    }
    for name, fn in losses.items():
        full = fn(slice(0, 4)).loss.item()
        halves = fn(slice(0, 2)).loss.item() + fn(slice(2, 4)).loss.item()
        assert full == pytest.approx(halves, rel=1e-5), name


# ---------------------------------------------------------------- centred target (departure)


def test_centered_targets_hand_computed_and_sum_to_zero():
    c = centered_targets([0.2, 0.5, 0.8, 0.1])  # mean 0.4
    assert c.tolist() == pytest.approx([-0.2, 0.1, 0.4, -0.3], abs=1e-6)
    assert abs(c.sum().item()) < 1e-6
    t = torch.tensor([0.9, 0.3], requires_grad=True)
    ct = centered_targets(t)
    assert ct.tolist() == pytest.approx([0.3, -0.3], abs=1e-6) and not ct.requires_grad


def test_centered_targets_single_and_empty_give_zeros_without_nan():
    assert centered_targets([0.7]).tolist() == [0.0]
    empty = centered_targets([])
    assert empty.shape == (0,) and torch.isfinite(empty).all()
    assert centered_targets(torch.tensor([])).numel() == 0

"""GRPO baseline with a verifiable reward (ALGORITHM.md "Baselines").

``rollout.samples_per_prompt`` samples per prompt form a group; the "audit" grades each answer (math:
math-verify, reward 1 if correct; code: the prompt's unit tests in the isolated sandbox, reward the share
passed, ``grpo.code_reward``) and computes group-relative advantages. One update per batch, so p_old =
p_theta (ratio 1). ``grpo.kl_coef`` adds the exact KL(p_theta || p_ref). No teacher.
"""

from __future__ import annotations

from typing import cast

import torch

from omniopd.config import RunConfig
from omniopd.core import LossInputs, group_advantages, reverse_kl_sliced, token_stats
from omniopd.data import Example
from omniopd.engine.alignment import SequenceBatch, response_hidden
from omniopd.engine.rollout import Rollouts
from omniopd.methods.base import (
    LossSpec,
    Method,
    StepSignal,
    TrainState,
    response_ids,
    sample_on_policy,
    sampling_departures,
)
from omniopd.training.sharding import in_forward


def correctness_reward(
    example: Example, text: str, code_reward: str = "fraction", insecure_no_isolation: bool = False
) -> float:
    """Math: 1.0 when the answer extracted from ``text`` equals the example's final answer (math-verify),
    else 0.0. Code (an example with unit tests): the share of its tests the extracted code passes
    (``code_reward="fraction"``), or 1.0 only when all pass (``"all"``), graded as evaluation grades
    (:func:`omniopd.evaluation.code.grade_tests`: the verdict is decided outside the code's process)."""
    if example.tests is not None:
        from omniopd.evaluation.code import grade_tests

        t = example.tests
        g = grade_tests(
            text,
            t.asserts,
            setup=[*t.imports, t.setup_code],
            reference=example.reference,
            insecure_no_isolation=insecure_no_isolation,
        )
        return g.fraction if code_reward == "fraction" else float(g.passed)
    from omniopd.evaluation.mathgrade import answers_match, extract_answer

    return float(answers_match(example.answer, extract_answer(text).answer))


def prepare(state: TrainState) -> None:
    """Code prompts are graded in the isolated sandbox: refuse at setup, not at the first step, when it is
    unavailable (unless ``eval.insecure_no_isolation``)."""
    if any(ex.tests is not None for ex in state.stream.examples):
        from omniopd.evaluation.code import check_isolation

        check_isolation(state.cfg.eval.insecure_no_isolation)


def audit(state: TrainState, rollouts: Rollouts, examples: list[Example]) -> StepSignal:
    # the reward is looked up as ``omniopd.methods.correctness_reward`` at every call, so replacing it there
    # (a test's reward that varies within groups) changes what the audit grades with
    import omniopd.methods as package
    from omniopd.evaluation.parallel import parallel_map

    G, cfg = state.cfg.rollout.samples_per_prompt, state.cfg
    # one sequence decodes to one str (transformers types decode's result for a batch as well)
    texts = [cast(str, state.tokenizer.decode(r, skip_special_tokens=True)) for r in response_ids(rollouts)]
    pairs = list(zip(rollouts.example_index, texts, strict=True))

    def reward(pair: tuple[int, str]) -> float:
        ex, text = examples[pair[0]], pair[1]
        if ex.tests is None:
            return package.correctness_reward(ex, text)
        return package.correctness_reward(ex, text, cfg.grpo.code_reward, cfg.eval.insecure_no_isolation)

    values = parallel_map(reward, pairs)
    rewards = torch.tensor(values, dtype=torch.float32)
    adv = group_advantages(rewards, G, normalize_std=cfg.grpo.normalize_std)
    groups = rewards.view(-1, G)
    return StepSignal(
        metrics={
            "rollout/reward_mean": float(rewards.mean()),
            "rollout/all_correct_frac": float((rewards == 1.0).float().mean()),
            "grpo/groups_with_signal": float((groups != groups[:, :1]).any(-1).float().mean()),
            "teacher/tokens": 0.0,
            "teacher/requests": 0.0,
        },
        advantages=adv,
    )


def _logprobs_and_ref_kl(state: TrainState, sub: SequenceBatch, want_kl: bool):
    """log p(y_t) (B, T) and, with ``want_kl``, KL(p_theta || p_ref) per token (B, T), else None; run inside
    the student's forward (``sharding.in_forward``)."""
    slice_size = state.cfg.loss.slice_size
    hidden, head = response_hidden(state.model, sub)
    logprobs = token_stats(hidden, head, sub.response_ids, slice_size=slice_size).logprobs
    if not want_kl:
        return logprobs, None
    with torch.no_grad():
        ref_hidden, ref_head = response_hidden(state.ref_model, sub)
    return logprobs, reverse_kl_sliced(hidden, head, ref_hidden, ref_head, slice_size=slice_size)


def loss(cfg: RunConfig) -> LossSpec:
    return "grpo", {"clip_eps": cfg.grpo.clip_eps, "kl_coef": cfg.grpo.kl_coef}


def skip_update(state: TrainState, signal: StepSignal) -> dict[str, float] | None:
    """Every group flat (all right or all wrong) and no KL term: the loss is exactly 0 and so is its gradient
    (with several processes every rank runs the backward, since the gradient all-reduce is collective)."""
    assert signal.advantages is not None  # set by audit
    flat = not bool(signal.advantages.abs().gt(0).any())
    if flat and state.cfg.grpo.kl_coef == 0 and state.accelerator.num_processes == 1:
        return {"loss/total": 0.0, "loss/grpo": 0.0, "grpo/skipped_flat_batch": 1.0}
    return None


def loss_inputs(state: TrainState, idx: list[int], sub: SequenceBatch, signal: StepSignal) -> LossInputs:
    """Each sequence's group-relative advantage; one update per batch, so p_old = p_theta (ratio 1)."""
    assert signal.advantages is not None  # set by audit
    logprobs, ref_kl = in_forward(state.model, _logprobs_and_ref_kl, state, sub, state.cfg.grpo.kl_coef > 0)
    return LossInputs(
        logprobs=logprobs,
        response_mask=sub.response_mask,
        advantages=signal.advantages[idx].to(state.accelerator.device),
        kl=ref_kl,
    )


def _no_teacher(cfg: RunConfig) -> None:
    return None


GRPO = Method(
    name="grpo",
    sample=sample_on_policy,
    audit=audit,
    loss=loss,
    loss_inputs=loss_inputs,
    teacher_role=_no_teacher,
    on_policy=True,
    prepare=prepare,
    departures=sampling_departures,
    skip_update=skip_update,
)

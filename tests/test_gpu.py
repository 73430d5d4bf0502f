"""Training on a CUDA device: the same numbers as on the CPU, and a full OmniOPD step with everything
on the GPU. Skipped where torch sees no CUDA device (CI has none; benchmarks/gpu_check.sh runs on a GPU)."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import tiny_run_files

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps one process-wide state (its device among it): these tests switch between the CPU
    and the GPU, so each starts and ends with a clean one."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def _cfg(model_dir, data, out, **extra):
    from omniopd.config import build_config

    base = {
        "output_dir": str(out), "max_steps": 2, "seed": 0, "student": {"name": str(model_dir)},
        "teacher": {"type": "privileged", "batch_size": 16},
        "audit": {"chunk_tokens": 4, "num_chunks": 2, "teacher_samples": 3},
        "rollout": {"samples_per_prompt": 2, "max_new_tokens": 20, "batch_size": 8},
        "optim": {"lr": 5e-2, "prompts_per_step": 2, "micro_batch_size": 2},
        "data": {"train": str(data)},
        "eval": {"data": str(data), "limit": 2, "max_new_tokens": 8, "before": False, "after": False},
    }
    base.update(extra)
    return build_config(base)


def _params_after_steps(cfg, steps: int, *, cpu: bool, monkeypatch) -> dict[str, torch.Tensor]:
    import omniopd.trainer as trainer

    monkeypatch.setattr(trainer, "_has_accelerator_device", lambda: not cpu)
    state = trainer.setup(cfg, overwrite=True)
    for _ in range(steps):
        trainer.train_step(state)
    model = state.accelerator.unwrap_model(state.model)
    assert next(model.parameters()).device.type == ("cpu" if cpu else "cuda")
    return {k: v.detach().float().cpu() for k, v in model.state_dict().items()}


def test_sft_steps_on_cuda_match_the_cpu(tmp_path, monkeypatch):
    # SFT on the reference solutions is deterministic (no sampling): two steps on the GPU must land
    # where two steps on the CPU do, up to float32 rounding in different kernels.
    model_dir, data = tiny_run_files(tmp_path)
    extra = {"method": "sft", "sft": {"source": "reference"}}
    from accelerate.state import AcceleratorState
    from transformers import AutoModelForCausalLM

    before = {k: v.float() for k, v in AutoModelForCausalLM.from_pretrained(model_dir).state_dict().items()}
    on_cpu = _params_after_steps(_cfg(model_dir, data, tmp_path / "cpu", **extra), 2, cpu=True, monkeypatch=monkeypatch)
    AcceleratorState._reset_state(reset_partial_state=True)
    on_gpu = _params_after_steps(_cfg(model_dir, data, tmp_path / "gpu", **extra), 2, cpu=False, monkeypatch=monkeypatch)
    moved = max(float((on_cpu[k] - before[k]).abs().max()) for k in before)
    assert moved > 1e-3  # the steps changed the weights
    diff = max(float((on_cpu[k] - on_gpu[k]).abs().max()) for k in before)
    assert diff <= 1e-3 * moved, (diff, moved)


def test_omniopd_steps_run_on_cuda(tmp_path, monkeypatch):
    model_dir, data = tiny_run_files(tmp_path)
    import omniopd.trainer as trainer

    state = trainer.setup(_cfg(model_dir, data, tmp_path / "run"), overwrite=True)
    assert state.accelerator.device.type == "cuda"
    before = {k: v.detach().clone() for k, v in state.accelerator.unwrap_model(state.model).state_dict().items()}
    rows = [trainer.train_step(state) for _ in range(2)]
    for row in rows:
        assert all(math.isfinite(v) for v in row.values() if isinstance(v, float))
        assert row["audit/chunks"] > 0 and row["teacher/tokens_out"] > 0
    after = state.accelerator.unwrap_model(state.model).state_dict()
    assert all(v.device.type == "cuda" for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)
    # the KL reference stays where the student is, frozen
    ref = state.ref_model
    assert next(ref.parameters()).device.type == "cuda"
    assert all(not p.requires_grad for p in ref.parameters())


def test_lora_omniopd_step_on_cuda(tmp_path):
    pytest.importorskip("peft")
    model_dir, data = tiny_run_files(tmp_path)
    import omniopd.trainer as trainer

    state = trainer.setup(_cfg(model_dir, data, tmp_path / "run", lora={"rank": 4, "alpha": 8.0}), overwrite=True)
    row = trainer.train_step(state)
    assert math.isfinite(row["loss/total"]) and row["audit/chunks"] > 0

"""Training on a CUDA device: the same numbers as on the CPU, and a full OmniOPD step with everything
on the GPU. Skipped where torch sees no CUDA device (CI has none; benchmarks/gpu_check.sh runs on a GPU)."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import tiny_run_config, tiny_run_files

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

    return build_config(tiny_run_config(model_dir, data, out, **extra))


def _sft_loss_and_grads(cfg, *, cpu: bool, monkeypatch) -> tuple[float, dict[str, torch.Tensor]]:
    """The first SFT step's loss and gradients (before the optimizer), on the CPU or the GPU."""
    import omniopd.training.trainer as trainer

    monkeypatch.setattr(trainer, "_has_accelerator_device", lambda: not cpu)
    state = trainer.setup(cfg, overwrite=True)
    method = trainer.METHODS["sft"]
    examples = state.stream.next_batch()
    rollouts = method.sample(state, examples)
    metrics = trainer.backward_phase(state, method, rollouts.batch, method.audit(state, rollouts, examples))
    model = state.accelerator.unwrap_model(state.model)
    assert next(model.parameters()).device.type == ("cpu" if cpu else "cuda")
    return metrics["loss/total"], {n: p.grad.detach().double().cpu() for n, p in model.named_parameters()}


def test_sft_gradients_on_cuda_match_the_cpu(tmp_path, monkeypatch):
    # SFT on the reference solutions is deterministic (no sampling): the GPU's loss and gradients must be
    # the CPU's up to float32 rounding in other kernels. (Parameters after AdamW steps are not compared:
    # Adam divides by the gradient's running scale, so rounding noise in near-zero gradient entries
    # becomes a full-size update there.)
    from accelerate.state import AcceleratorState

    model_dir, data = tiny_run_files(tmp_path)
    extra = {"method": "sft", "sft": {"source": "reference"}}
    loss_cpu, g_cpu = _sft_loss_and_grads(_cfg(model_dir, data, tmp_path / "cpu", **extra), cpu=True, monkeypatch=monkeypatch)
    AcceleratorState._reset_state(reset_partial_state=True)
    loss_gpu, g_gpu = _sft_loss_and_grads(_cfg(model_dir, data, tmp_path / "gpu", **extra), cpu=False, monkeypatch=monkeypatch)
    assert loss_cpu > 0 and abs(loss_gpu - loss_cpu) <= 1e-5 * loss_cpu
    norm = torch.sqrt(sum((g ** 2).sum() for g in g_cpu.values()))
    diff = torch.sqrt(sum(((g_cpu[k] - g_gpu[k]) ** 2).sum() for k in g_cpu))
    assert norm > 0 and diff <= 1e-4 * norm, (float(diff), float(norm))


def test_omniopd_steps_run_on_cuda(tmp_path, monkeypatch):
    model_dir, data = tiny_run_files(tmp_path)
    import omniopd.training.trainer as trainer

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
    import omniopd.training.trainer as trainer

    state = trainer.setup(_cfg(model_dir, data, tmp_path / "run", lora={"rank": 4, "alpha": 8.0}), overwrite=True)
    row = trainer.train_step(state)
    assert math.isfinite(row["loss/total"]) and row["audit/chunks"] > 0
    model = state.accelerator.unwrap_model(state.model)
    assert all(p.device.type == "cuda" for p in model.parameters())
    assert all(p.grad is None or p.grad.abs().sum() == 0 for n, p in model.named_parameters() if "lora_" not in n)

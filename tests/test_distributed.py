"""Two CPU processes (accelerate launch, gloo) against one: data parallelism gives the same model.

SFT on the dataset's reference solutions is deterministic (no sampling), so 2 processes x 1 prompt per
step must end with the parameters of 1 process x 2 prompts per step, up to float summation order.
An OmniOPD run on 2 processes writes one combined metrics line per step and both ranks' audit records.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import tiny_run_config, tiny_run_files
from omniopd.training.distributed import combine_metrics, rank_slice

ROOT = Path(__file__).resolve().parents[1]
DDP_CPU = ROOT / "recipes" / "accelerate" / "ddp-cpu.yaml"


def test_combine_metrics_by_hand():
    a = {"teacher/tokens": 10.0, "audit/chunks": 3.0, "audit/k_sem_mean": 1.0, "time/step_s": 2.0, "loss/total": 0.5,
         "audit/target_min": 0.2}
    b = {"teacher/tokens": 4.0, "audit/chunks": 1.0, "audit/k_sem_mean": 3.0, "time/step_s": 5.0, "loss/total": 1.5,
         "audit/target_min": 0.1}
    c = {"teacher/tokens": 0.0, "audit/chunks": 0.0, "time/step_s": 1.0, "loss/total": 1.0}  # audited nothing
    out = combine_metrics([a, b, c])
    assert out["teacher/tokens"] == 14.0 and out["audit/chunks"] == 4.0
    assert out["audit/k_sem_mean"] == pytest.approx((3 * 1.0 + 1 * 3.0) / 4)  # chunk-weighted
    assert out["time/step_s"] == 5.0 and out["audit/target_min"] == 0.1
    assert out["loss/total"] == pytest.approx(1.0)
    assert set(out) == set(a)  # the union of keys, whatever a rank lacked
    assert rank_slice([1, 2, 3, 4], 1, 2) == [3, 4]


def _setup(tmp_path) -> tuple[Path, Path]:
    return tiny_run_files(tmp_path, rows=8)


def _recipe(tmp_path, name, model_dir, data, **extra) -> Path:
    cfg = tiny_run_config(model_dir, data, tmp_path / name, lr=1e-3, **extra)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _launch(recipe: Path, processes: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(DDP_CPU),
           "--num_processes", str(processes), "-m", "omniopd.cli", "train", str(recipe), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_two_processes_match_one_process_with_twice_the_batch(tmp_path):
    model_dir, data = _setup(tmp_path)
    sft = {"method": "sft", "sft": {"source": "reference"}}
    one = _recipe(tmp_path, "one", model_dir, data, **sft)
    two = _recipe(tmp_path, "two", model_dir, data, **sft)
    _launch(one, 1)
    _launch(two, 2)
    w1, w2, w0 = _weights(tmp_path / "one" / "final"), _weights(tmp_path / "two" / "final"), _weights(model_dir)
    moved = max(float((w1[k] - w0[k]).abs().max()) for k in w0)
    assert moved > 1e-4, "training did not move the weights"
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=1e-5 * max(moved, 1.0), msg=lambda m, k=k: f"{k}: {m}")
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["processes"] == 2
    assert json.loads((tmp_path / "one" / "summary.json").read_text())["processes"] == 1
    lines = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2]  # written once, by the main process
    assert len(list((tmp_path / "two" / "checkpoints").iterdir())) == 1


def test_two_process_run_resumes_where_it_stopped(tmp_path):
    # a 2-process run stopped after step 1 and resumed from its checkpoint ends where an uninterrupted
    # 2-process run does (SFT on the references: no sampling, so the two runs do the same arithmetic)
    model_dir, data = _setup(tmp_path)
    sft = {"method": "sft", "sft": {"source": "reference"}, "checkpoint": {"every_steps": 1}}
    _launch(_recipe(tmp_path, "full", model_dir, data, **sft), 2)
    _launch(_recipe(tmp_path, "cut", model_dir, data, max_steps=1, **sft), 2)
    first = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in first] == [1]
    _launch(_recipe(tmp_path, "cut", model_dir, data, resume=True, **sft), 2)
    lines = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2]
    assert lines[0] == first[0]  # step 1 was kept from the first launch, not trained again
    full, cut, base = _weights(tmp_path / "full" / "final"), _weights(tmp_path / "cut" / "final"), _weights(model_dir)
    assert max(float((full[k] - base[k]).abs().max()) for k in base) > 1e-4
    for k in full:
        torch.testing.assert_close(cut[k], full[k], rtol=0, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


def test_two_process_omniopd_run_combines_metrics_and_records(tmp_path):
    model_dir, data = _setup(tmp_path)
    recipe = _recipe(tmp_path, "omni", model_dir, data)
    proc = _launch(recipe, 2)
    assert proc.stdout.count("== omniopd summary ==") == 1  # printed once
    out = tmp_path / "omni"
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2]
    for m in lines:
        assert m["rollout/trajectories"] == 4.0  # 2 ranks x 1 prompt x 2 samples
        assert "audit/chunks" in m and "teacher/tokens" in m
    records = [json.loads(x) for x in (out / "audits.jsonl").read_text().splitlines()]
    assert {r["rank"] for r in records} == {0, 1} and len(records) == 8  # 4 trajectories per step, 2 steps
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2
    assert summary["teacher_tokens"] == pytest.approx(sum(m["teacher/tokens"] for m in lines))
    assert (out / "final" / "model.safetensors").is_file()


def test_uneven_prompt_split_is_refused(tmp_path):
    model_dir, data = _setup(tmp_path)
    recipe = _recipe(tmp_path, "odd", model_dir, data, optim={"prompts_per_step": 3})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(DDP_CPU), "-m", "omniopd.cli",
           "train", str(recipe), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode != 0
    assert "cannot be split evenly over 2 processes" in proc.stderr

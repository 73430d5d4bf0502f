"""Sharded training (``distributed.strategy: fsdp2``, PyTorch FSDP2) on 2 CPU processes (torchrun, gloo).

- The token statistics of the sharded student, computed inside its root's forward, equal the whole
  model's, and so do the gradients (both KL references: a frozen sharded copy and LoRA's base network).
- SFT on the dataset's reference solutions is deterministic (no sampling), so a 2-process FSDP2 run must
  end with the parameters of a 1-process run of the same global batch, up to float summation order:
  |difference| <= 1e-5 x max(1, largest change of a weight in training). Its checkpoint is resumed by one
  process (re-sharded on load) and ends where the 2-process run does, within the same tolerance.
- A 2-process OmniOPD run (LoRA, a teacher on the student's own base model) writes one metrics line per
  step, evaluates whole models before and after training, and ``final/`` loads with ``from_pretrained``.
- An OmniOPD run (full fine-tuning, a sharded frozen reference) killed after its step-2 checkpoint and
  resumed with 2 processes ends exactly where the uninterrupted run does: every rank's RNG is restored.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import tiny_run_config, tiny_run_files

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
FSDP2 = {"distributed": {"strategy": "fsdp2"}}
SFT = {"method": "sft", "sft": {"source": "reference"}}


def _torchrun(processes: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), *args]


def _train(processes: int, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    train = ["-m", "omniopd.cli", "train", *args, "--no-progress"]
    cmd = [sys.executable, *train] if processes == 1 else _torchrun(processes, *train)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _recipe(tmp_path: Path, name: str, model_dir: Path, data: Path, **extra) -> Path:
    cfg = tiny_run_config(model_dir, data, tmp_path / name, lr=1e-3, **extra)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def _rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _assert_same_weights(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


def test_sharded_token_stats_and_gradients_match_the_whole_model(tmp_path):
    out = tmp_path / "stats.json"
    cmd = _torchrun(2, str(ROOT / "tests" / "fsdp_stats_worker.py"), str(out))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600, cwd=ROOT / "tests")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank, cases in enumerate(json.loads(out.read_text())):
        for name, r in cases.items():
            where = f"rank {rank}, {name}"
            assert r["kl_max"] > 1e-3, f"{where}: the reference equals the student; the KL check is empty"
            for key in ("logprobs", "entropy", "kl", "no_grad_entropy"):
                assert r[key] <= 1e-5, f"{where}: {key} differs by {r[key]}"
            assert r["grad"] <= 1e-5 * max(1.0, r["grad_max"]), f"{where}: gradients differ by {r['grad']}"
            assert r["local_elements"] * 2 == r["total_elements"], f"{where}: the rank does not hold half the weights"
        assert cases["full"]["grads"] == 20 and cases["lora"]["grads"] == 28  # every trained tensor got its gradient


@pytest.fixture(scope="module")
def sft_runs(tmp_path_factory):
    """A 1-process SFT run and the same run on 2 FSDP2 processes (checkpoint after each step)."""
    tmp = tmp_path_factory.mktemp("fsdp_sft")
    model_dir, data = tiny_run_files(tmp, rows=8)
    _train(1, str(_recipe(tmp, "one", model_dir, data, **SFT)))
    _train(2, str(_recipe(tmp, "two", model_dir, data, **SFT, **FSDP2, checkpoint={"every_steps": 1})))
    return tmp, model_dir


def test_two_process_fsdp2_sft_matches_one_process(sft_runs):
    tmp, model_dir = sft_runs
    w0, w1, w2 = _weights(model_dir), _weights(tmp / "one" / "final"), _weights(tmp / "two" / "final")
    moved = max(float((w1[k] - w0[k]).abs().max()) for k in w0)
    assert moved > 1e-4, "training did not move the weights"
    _assert_same_weights(w1, w2, atol=1e-5 * max(moved, 1.0))
    assert json.loads((tmp / "two" / "summary.json").read_text())["processes"] == 2
    assert [m["step"] for m in _rows(tmp / "two")] == [1, 2]  # one line per step, written by the main process
    ckpt = tmp / "two" / "checkpoints" / "step-000002"
    shards = sorted(p.name for p in (ckpt / "sharded").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # each process wrote its own shards
    assert {p.name for p in ckpt.glob("rng-rank*.pt")} == {"rng-rank0.pt", "rng-rank1.pt"}
    assert json.loads((ckpt / "trainer_state.json").read_text())["world_size"] == 2


def test_fsdp2_final_model_loads_with_from_pretrained(sft_runs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp, _ = sft_runs
    final = tmp / "two" / "final"
    model = AutoModelForCausalLM.from_pretrained(final)
    AutoTokenizer.from_pretrained(final)
    trained = _weights(final)
    for name, p in model.state_dict().items():
        if name in trained:
            assert torch.equal(p, trained[name]), name


def test_fsdp2_checkpoint_resumes_on_one_process(sft_runs):
    # DCP re-shards on load: the 2-process checkpoint after step 1 is continued by one process
    tmp, model_dir = sft_runs
    cut = tmp / "cut"
    shutil.copytree(tmp / "two", cut)
    shutil.rmtree(cut / "final")
    shutil.rmtree(cut / "checkpoints" / "step-000002")
    proc = _train(1, "--resume", str(cut))
    assert "written by 2 processes, resumed by 1" in proc.stderr + proc.stdout
    assert [m["step"] for m in _rows(cut)] == [1, 2]
    w0, w2, wc = _weights(model_dir), _weights(tmp / "two" / "final"), _weights(cut / "final")
    moved = max(float((w2[k] - w0[k]).abs().max()) for k in w0)
    _assert_same_weights(w2, wc, atol=1e-5 * max(moved, 1.0))


def test_two_process_fsdp2_omniopd_lora_run_writes_one_metrics_line_per_step(tmp_path):
    from transformers import AutoModelForCausalLM

    model_dir, data = tiny_run_files(tmp_path, rows=8)
    # evaluation before (the initial student, loaded whole) and after (the gathered final model) training
    recipe = _recipe(tmp_path, "omni", model_dir, data, **FSDP2, lora={"rank": 4}, eval={"before": True, "after": True})
    proc = _train(2, str(recipe))
    assert proc.stdout.count("== omniopd summary ==") == 1
    out = tmp_path / "omni"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["accuracy_before"]["n"] == 2 and summary["accuracy_after"]["n"] == 2
    lines = _rows(out)
    assert [m["step"] for m in lines] == [1, 2]
    for m in lines:
        assert m["rollout/trajectories"] == 4.0  # 2 ranks x 1 prompt x 2 samples
        assert "audit/chunks" in m and "loss/kl_anchor" in m
    records = [json.loads(x) for x in (out / "audits.jsonl").read_text().splitlines()]
    assert {r["rank"] for r in records} == {0, 1}
    assert (out / "final" / "adapter" / "adapter_model.safetensors").is_file()
    merged = AutoModelForCausalLM.from_pretrained(out / "final")
    assert not any("lora" in n for n, _ in merged.named_parameters())


def test_killed_fsdp2_run_resumes_exactly_where_the_straight_run_ends(tmp_path):
    model_dir, data = tiny_run_files(tmp_path, rows=8)
    teacher = tmp_path / "teacher"  # another path: the KL reference is then a sharded frozen copy
    shutil.copytree(model_dir, teacher)
    run = {**FSDP2, "max_steps": 4, "checkpoint": {"every_steps": 1, "keep_last": 3},
           "teacher": {"type": "privileged", "model": str(teacher), "batch_size": 16}}
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    _train(2, str(_recipe(tmp_path, "straight", model_dir, data, **run)))
    cmd = _torchrun(2, "-m", "omniopd.cli", "train", str(_recipe(tmp_path, "killed", model_dir, data, **run)), "--no-progress")
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (killed / "checkpoints" / "step-000002").is_dir():
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both workers
    proc.wait()
    assert (killed / "checkpoints" / "step-000002").is_dir()
    assert not (killed / "final").exists()
    for ck in (killed / "checkpoints").iterdir():  # the kill may have landed after a later checkpoint
        if ck.name > "step-000002":
            shutil.rmtree(ck)
    _train(2, "--resume", str(killed))
    rows_a, rows_b = _rows(straight), _rows(killed)
    assert [r["step"] for r in rows_b] == [1, 2, 3, 4]
    assert rows_a[1]["loss/kl_anchor"] > 0  # the sharded reference is used
    for a, b in zip(rows_a[2:], rows_b[2:]):
        assert {k: v for k, v in a.items() if not k.startswith("time/")} == {k: v for k, v in b.items() if not k.startswith("time/")}
    _assert_same_weights(_weights(straight / "final"), _weights(killed / "final"), atol=0.0)


def test_fsdp2_refuses_evaluation_during_training(tmp_path):
    model_dir, data = tiny_run_files(tmp_path, rows=8)
    recipe = _recipe(tmp_path, "evals", model_dir, data, **FSDP2, eval={"every_steps": 1})
    proc = _train(2, str(recipe), check=False)
    assert proc.returncode != 0
    assert "eval.every_steps: evaluation during training is not available with distributed.strategy=fsdp2" in proc.stderr

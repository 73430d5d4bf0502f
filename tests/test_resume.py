"""Checkpoints survive a kill; a resumed run continues exactly where the straight run would be."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from omniopd.config import dump_config
from omniopd.errors import OmniOPDError
from omniopd.training.checkpoint import list_checkpoints
from omniopd.training.trainer import train
from test_train_tiny import _cfg

ROOT = Path(__file__).resolve().parents[1]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def _rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _without_timings(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith("time/")}


def _recipe(tiny_model_dir, data, out, tmp_path, **extra) -> Path:
    cfg = _cfg(tiny_model_dir, data, out, {"type": "privileged"}, max_steps=4,
               checkpoint={"every_steps": 1, "keep_last": 3}, **extra)
    cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"after": False})})
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(dump_config(cfg))
    return path


def test_kill_and_resume_equals_straight_run(tiny_model_dir, gsm8k_like, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    subprocess.run([sys.executable, "-m", "omniopd", "train", str(_recipe(tiny_model_dir, gsm8k_like, straight, tmp_path)), "--no-progress"],
                   check=True, env=env, capture_output=True, timeout=600)
    # the same run, SIGKILLed as soon as its step-2 checkpoint exists (mid step 3)
    proc = subprocess.Popen([sys.executable, "-m", "omniopd", "train", str(_recipe(tiny_model_dir, gsm8k_like, killed, tmp_path)), "--no-progress"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (killed / "checkpoints" / "step-000002").is_dir():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (killed / "checkpoints" / "step-000002").is_dir()
    assert not (killed / "final").exists()
    for ck in list_checkpoints(killed):  # the kill may have landed after step 3's checkpoint: go back to 2
        if ck.name > "step-000002":
            import shutil

            shutil.rmtree(ck)
    proc = subprocess.run([sys.executable, "-m", "omniopd", "train", "--resume", str(killed), "--no-progress"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    a, b = _weights(straight / "final"), _weights(killed / "final")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-5), k
    ra, rb = _rows(straight), _rows(killed)
    assert [r["step"] for r in rb] == [1, 2, 3, 4]  # appended, no duplicates
    for x, y in zip(ra[2:], rb[2:]):
        xa, ya = _without_timings(x), _without_timings(y)
        assert xa.keys() == ya.keys()
        for k in xa:
            assert xa[k] == pytest.approx(ya[k], rel=1e-4, abs=1e-6), k


def test_kill_during_checkpoint_write_leaves_previous_checkpoint(tiny_model_dir, gsm8k_like, tmp_path, monkeypatch):
    out = tmp_path / "run"
    recipe = _recipe(tiny_model_dir, gsm8k_like, out, tmp_path)
    from omniopd.config import load_config
    from omniopd.training import checkpoint as ckmod

    real_save = torch.save
    calls = {"n": 0}

    def dying_save(obj, f, *a, **k):  # the 4th torch.save is step 2's optimizer state: die there
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("injected kill during checkpoint write")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(ckmod.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train(load_config(recipe), progress=False)
    monkeypatch.setattr(ckmod.torch, "save", real_save)
    assert [p.name for p in list_checkpoints(out)] == ["step-000001"]
    assert (out / "checkpoints" / "step-000002.tmp").exists()  # the half-written one is not a checkpoint
    summary = train(load_config(recipe, ["resume=auto"]), progress=False)
    assert summary["steps"] == 4 and [r["step"] for r in _rows(out)] == [1, 2, 3, 4]


def test_resume_with_a_different_config_is_refused(tiny_model_dir, gsm8k_like, tmp_path):
    out = tmp_path / "run"
    recipe = _recipe(tiny_model_dir, gsm8k_like, out, tmp_path)
    from omniopd.config import load_config

    train(load_config(recipe, ["max_steps=1"]), progress=False)
    with pytest.raises(OmniOPDError, match="different config.*optim"):
        train(load_config(recipe, ["resume=true", "optim.lr=0.5"]), progress=False)


def test_corrupt_checkpoint_is_a_clear_error(tiny_model_dir, gsm8k_like, tmp_path):
    out = tmp_path / "run"
    recipe = _recipe(tiny_model_dir, gsm8k_like, out, tmp_path)
    from omniopd.config import load_config

    train(load_config(recipe, ["max_steps=1"]), progress=False)
    ck = list_checkpoints(out)[-1]
    (ck / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(OmniOPDError, match="cannot be loaded"):
        train(load_config(recipe, ["resume=true"]), progress=False)

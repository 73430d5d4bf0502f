"""Invalid input exits with status 2 and one line naming the problem, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "gsm8k-smollm2-cpu.yaml"


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, "-m", "omniopd", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("omniopd: error:")]
    assert len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in errors[0], errors[0]


@pytest.mark.parametrize(
    "override, needles",
    [
        ("audit.phi=cosine_magic", ("audit.phi", "cosine_magic")),
        ("audit.chunk_tokens=0", ("audit.chunk_tokens", "greater than 0")),
        ("audit.teacher_samples=0", ("audit.teacher_samples", "greater than or equal to 1")),
        ("teacher.temperature=0", ("teacher.temperature", "greedy")),
        ("audit.prior_strength=-0.5", ("audit.prior_strength", "greater than or equal to 0")),
        ("audit.unknown_key=3", ("unknown config key", "audit.unknown_key")),
    ],
)
def test_bad_config_values(override, needles):
    assert_one_line_error(run_cli("train", str(RECIPE), override, "output_dir=/nonexistent/never-written"), *needles)


def test_missing_recipe(tmp_path):
    assert_one_line_error(run_cli("train", str(tmp_path / "nope.yaml")), "recipe not found")


def test_missing_dataset(tmp_path):
    proc = run_cli("train", str(RECIPE), f"data.train={tmp_path / 'missing.jsonl'}", f"output_dir={tmp_path / 'out'}")
    assert_one_line_error(proc, "dataset file not found", "missing.jsonl")


def test_malformed_dataset_row_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "1 #### 1"}) + "\n{not json\n")
    proc = run_cli("train", str(RECIPE), f"data.train={bad}", f"output_dir={tmp_path / 'out'}")
    assert_one_line_error(proc, f"{bad}:2", "not valid JSON")
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_row_missing_a_field(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "1 #### 1"}) + "\n" + json.dumps({"question": "q2"}) + "\n")
    assert_one_line_error(run_cli("eval", "--model", "x", "--data", str(bad), "--output", str(tmp_path / "o.json")), f"{bad}:2", "answer")


def test_missing_model_path(tmp_path):
    proc = run_cli("eval", "--model", str(tmp_path / "no-such-model"), "--data", "gsm8k-dev", "--limit", "1", "--output", str(tmp_path / "o.json"))
    assert_one_line_error(proc, "model path not found", "no-such-model")


def test_missing_model_in_recipe(tmp_path):
    proc = run_cli("train", str(RECIPE), f"student.name={tmp_path / 'gone.gguf'}", f"output_dir={tmp_path / 'out'}")
    assert_one_line_error(proc, "model path not found", "gone.gguf")


def test_unknown_named_dataset(tmp_path):
    assert_one_line_error(run_cli("eval", "--model", "x", "--data", "gsm9k", "--output", str(tmp_path / "o.json")), "unknown dataset")


def test_help_is_instant_and_lists_commands():
    proc = run_cli("--help")
    assert proc.returncode == 0 and "train" in proc.stdout and "eval" in proc.stdout


def test_unknown_dataset_lists_every_name_the_loaders_resolve(tmp_path):
    from omniopd.data import dataset_names

    proc = run_cli("eval", "--model", "smollm2-135m-instruct", "--data", "humanevalx", "--limit", "3", "--output", str(tmp_path / "e.json"))
    assert_one_line_error(proc, "unknown dataset 'humanevalx'", "humaneval,", "mbppplus", *dataset_names())
    assert not (tmp_path / "e.json").exists()


@pytest.mark.parametrize(
    "argv",
    [
        ("eval", "--model", "smollm2-135m-instruc", "--data", "gsm8k-dev", "--limit", "3", "--output", "{out}/e.json"),
        ("train", str(RECIPE), "student.name=smollm2-135m-instruc", "output_dir={out}/run"),
        ("train", str(RECIPE), "teacher.model=smollm2-135m-instruc", "output_dir={out}/run"),
    ],
    ids=["eval --model", "student.name", "teacher.model"],
)
def test_a_misspelled_model_name_is_one_line_with_the_closest_packaged_name(tmp_path, argv):
    proc = run_cli(*(a.format(out=tmp_path) for a in argv))
    assert_one_line_error(
        proc, "unknown model 'smollm2-135m-instruc'", "qwen2.5-coder-0.5b-instruct", "did you mean 'smollm2-135m-instruct'"
    )
    assert "huggingface.co" not in proc.stderr
    assert not any(tmp_path.iterdir())  # nothing written, nothing loaded

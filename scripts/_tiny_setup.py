"""Shared setup of the fake-provider demonstration scripts: a tiny random student and a GSM8K-style set."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import conftest  # noqa: E402 - the tests' tiny-model builders


def tiny_student_and_data(num_rows: int = 39) -> tuple[Path, Path, Path, dict[str, str]]:
    """(temp dir, tiny student dir, train jsonl, environment for `python -m omniopd` subprocesses)."""
    tmp = Path(tempfile.mkdtemp())
    tok = conftest.char_tokenizer()
    conftest.tiny_llama(vocab_size=len(tok)).save_pretrained(tmp / "m")
    tok.save_pretrained(tmp / "m")
    rows = [
        {"question": f"Tom has {i} apples and buys {i + 1} more. How many now?", "answer": f"{i}+{i + 1}={2 * i + 1}\n#### {2 * i + 1}"}
        for i in range(1, num_rows + 1)
    ]
    (tmp / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return tmp, tmp / "m", tmp / "d.jsonl", {**os.environ, "PYTHONPATH": str(ROOT / "src")}

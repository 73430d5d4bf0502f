"""Datasets: named benchmarks from the shared data folder, or any jsonl a user points at.

A row becomes an :class:`Example` with the question, the final answer used for grading and, where
the dataset has one, the full reference solution (what a privileged teacher sees). A malformed row
raises :class:`~omniopd.errors.DataError` naming the file and line; nothing is silently skipped.

Where the shared data lives: ``$OMNIOPD_DATA_DIR`` if set, else the first ``shared/data`` found next to
the current directory or next to this checkout (``../shared/data`` from the project root).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from omniopd.errors import DataError

# name -> (relative path, question field, answer field)
NAMED_DATASETS: dict[str, tuple[str, str, str]] = {
    "gsm8k-train": ("gsm8k/train.jsonl", "question", "answer"),
    "gsm8k-dev": ("gsm8k/dev.jsonl", "question", "answer"),
    "math500": ("math500/test.jsonl", "problem", "answer"),
    "amc23": ("amc23/test.jsonl", "problem", "answer"),
    "aime24": ("aime24/test.jsonl", "problem", "answer"),
}


@dataclass(frozen=True)
class Example:
    id: str
    question: str
    answer: str  # the final answer a grader compares against
    reference: str | None = None  # a full worked solution, when the dataset has one


def shared_data_dir() -> Path:
    env = os.environ.get("OMNIOPD_DATA_DIR")
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    for base in [Path.cwd(), *Path.cwd().parents, *here.parents]:
        cand = base / "shared" / "data"
        if cand.is_dir():
            return cand
        cand = base.parent / "shared" / "data"
        if cand.is_dir():
            return cand
    raise DataError("shared data folder not found: set OMNIOPD_DATA_DIR to the folder holding gsm8k/, math500/, ...")


def split_gsm8k_answer(answer: str) -> tuple[str, str]:
    """GSM8K's ``answer`` is a worked solution ending in ``#### <number>``: return (final, solution)."""
    if "####" not in answer:
        raise ValueError("no '#### <answer>' marker")
    final = answer.rsplit("####", 1)[1].strip().replace(",", "")
    if not final:
        raise ValueError("empty answer after '####'")
    return final, answer.strip()


def iter_json_rows(path: Path):
    """(line number, JSON object) for each non-blank line of a .jsonl (or .jsonl.gz) file; any malformed
    line raises :class:`DataError` naming the file and line."""
    import gzip

    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise DataError(f"{path}:{lineno}: not UTF-8 text (byte {err.start})") from None
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
                except (ValueError, RecursionError) as err:  # e.g. a 5000-digit integer, absurd nesting
                    raise DataError(f"{path}:{lineno}: JSON value cannot be read ({type(err).__name__})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
                yield lineno, row
    except (OSError, EOFError) as err:  # unreadable or truncated (.gz) file
        raise DataError(f"{path}: cannot be read ({err})") from None


def load_examples(
    spec: str,
    limit: int | None = None,
    question_field: str | None = None,
    answer_field: str | None = None,
) -> list[Example]:
    """Load a named dataset (``gsm8k-dev``, ...) or a jsonl path."""
    if spec in NAMED_DATASETS:
        rel, qf, af = NAMED_DATASETS[spec]
        path = shared_data_dir() / rel
    else:
        path = Path(spec)
        if not path.suffix.startswith(".json"):
            names = ", ".join(NAMED_DATASETS)
            raise DataError(f"unknown dataset {spec!r}: use one of {names}, or a path to a .jsonl file")
        qf, af = "question", "answer"
    qf = question_field or qf
    af = answer_field or af
    if not path.is_file():
        raise DataError(f"dataset file not found: {path}")
    gsm8k_style = spec.startswith("gsm8k")
    examples: list[Example] = []
    for lineno, row in iter_json_rows(path):
        q = row.get(qf)
        if q is None and question_field is None:  # a user jsonl may call it either
            q = row.get("problem", row.get("question"))
        a = row.get(af)
        if not isinstance(q, str) or not q.strip():
            raise DataError(f"{path}:{lineno}: missing or empty text field '{qf}'")
        if a is None or (isinstance(a, str) and not a.strip()):
            raise DataError(f"{path}:{lineno}: missing or empty field '{af}'")
        if isinstance(a, float) and not math.isfinite(a):
            raise DataError(f"{path}:{lineno}: field '{af}' is {a}, not a finite number")
        if isinstance(a, (int, float)) and not isinstance(a, bool):
            a = str(a)
        if not isinstance(a, str):
            raise DataError(f"{path}:{lineno}: field '{af}' must be text or a number, got {type(a).__name__}")
        reference = row.get("solution") if isinstance(row.get("solution"), str) else None
        if gsm8k_style or (reference is None and "####" in a):
            try:
                a, reference = split_gsm8k_answer(a)
            except ValueError as err:
                raise DataError(f"{path}:{lineno}: field '{af}': {err}") from None
        ex_id = str(row.get("id", row.get("unique_id", row.get("task_id", f"{path.stem}-{lineno}"))))
        examples.append(Example(id=ex_id, question=q.strip(), answer=a.strip(), reference=reference))
        if limit is not None and len(examples) >= limit:
            break
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples

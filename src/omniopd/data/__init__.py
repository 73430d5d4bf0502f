"""Datasets: named benchmarks from the shared data folder, or any jsonl a user points at.

A row becomes an :class:`Example` with the question, the final answer used for grading and, where
the dataset has one, the full reference solution (what a privileged teacher sees). A malformed row
raises :class:`~omniopd.errors.DataError` naming the file and line; nothing is silently skipped.

Code prompts: ``mbpp`` (MBPP's train and validation splits, ``mbpp:<split>+<split>`` for others, always
without the tasks MBPP+ evaluates), or any jsonl whose rows carry a ``prompt``/``text`` plus tests or code
(MBPP-style ``test_list``/``code``, HumanEval-style ``test``/``canonical_solution``). Their question has the
form of an MBPP+ evaluation prompt and their :class:`CodeTests` are kept for a test-based reward.
Training loads go through :func:`load_train_examples`, which refuses a set sharing task ids with an
evaluation set (MBPP+ by MBPP task number, HumanEval by task id) unless ``data.allow_eval_overlap``.

Where the shared data lives: ``$OMNIOPD_DATA_DIR`` if set, else the first ``shared/data`` found next to
the current directory or next to this checkout (``../shared/data`` from the project root).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from omniopd.engine.prompts import CODE_INSTRUCTION
from omniopd.errors import DataError

# name -> (relative path, question field, answer field)
NAMED_DATASETS: dict[str, tuple[str, str, str]] = {
    "gsm8k-train": ("gsm8k/train.jsonl", "question", "answer"),
    "gsm8k-dev": ("gsm8k/dev.jsonl", "question", "answer"),
    "math500": ("math500/test.jsonl", "problem", "answer"),
    "amc23": ("amc23/test.jsonl", "problem", "answer"),
    "aime24": ("aime24/test.jsonl", "problem", "answer"),
}


# MBPP's splits by task_id (mbpp/README.md); the training prompts default to train + validation
MBPP_FILE = "mbpp/mbpp.jsonl"
MBPP_SPLITS: dict[str, tuple[int, int]] = {
    "prompt": (1, 10),
    "test": (11, 510),
    "validation": (511, 600),
    "train": (601, 974),
}
MBPP_DEFAULT_SPLITS = ("train", "validation")
# MBPP tasks that MBPP+ evaluates under another task number (the same task, reworded at most): MBPP
# task -> MBPP+ task. Excluded from training like the MBPP+ task ids themselves.
MBPP_NEAR_DUPLICATES = {625: 591, 658: 130, 673: 439, 922: 415, 928: 427}
# the evaluation sets a training set must not share task ids with (EvalPlus ids: "Mbpp/<n>", "HumanEval/<n>")
EVAL_ID_FILES = {"mbppplus": "mbppplus/MbppPlus.jsonl", "humaneval": "humaneval/HumanEval.jsonl.gz"}
CODE_BENCHMARKS = ("humaneval", "mbppplus")  # graded by running code (evaluation.code loads them)


def is_mbpp_spec(spec: str) -> bool:
    """``mbpp`` or ``mbpp:<split>+<split>``: MBPP prompts, graded by their own unit tests."""
    return spec.strip().lower() == "mbpp" or spec.strip().lower().startswith("mbpp:")


def is_code_dataset(spec: str) -> bool:
    """A set graded by running code: the code benchmarks and MBPP's prompts (by their ``test_list``)."""
    return spec.strip().lower() in CODE_BENCHMARKS or is_mbpp_spec(spec)


def dataset_names() -> list[str]:
    """Every dataset name the loaders resolve: the math sets, ``mbpp`` and the code benchmarks."""
    return [*NAMED_DATASETS, "mbpp", *CODE_BENCHMARKS]


OVERLAP_OVERRIDE = "data.allow_eval_overlap=true"


@dataclass(frozen=True)
class CodeTests:
    """The unit tests of a code prompt: MBPP's ``test_list``, ``test_setup_code`` and ``test_imports``
    (a HumanEval-style row: its ``test`` as setup and ``check(<entry_point>)`` as the one assert)."""

    asserts: tuple[str, ...]
    setup_code: str = ""
    imports: tuple[str, ...] = ()

    def script(self) -> str:
        """The test program to run after a candidate solution."""
        return "\n".join([*self.imports, self.setup_code, *self.asserts]).strip() + "\n"


@dataclass(frozen=True)
class Example:
    id: str
    question: str
    answer: str  # the final answer a grader compares against ("" for a code prompt: its tests grade it)
    reference: str | None = None  # a full worked solution, when the dataset has one
    instruction: str | None = None  # the answer-format instruction (prompts.py); None: the math default
    tests: CodeTests | None = None  # a code prompt's unit tests


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
    """Load a named dataset (``gsm8k-dev``, ``mbpp``, ...) or a jsonl path (no evaluation-overlap check:
    a training set is loaded with :func:`load_train_examples`)."""
    if is_mbpp_spec(spec):
        return load_mbpp(spec, limit=limit)
    if spec in NAMED_DATASETS:
        rel, qf, af = NAMED_DATASETS[spec]
        path = shared_data_dir() / rel
    else:
        path = Path(spec)
        if not (path.suffix.startswith(".json") or path.name.endswith((".jsonl.gz", ".json.gz"))):
            names = ", ".join(dataset_names())
            raise DataError(f"unknown dataset {spec!r}: use one of {names}, or a path to a .jsonl file")
        qf, af = "question", "answer"
    qf = question_field or qf
    af = answer_field or af
    if not path.is_file():
        raise DataError(f"dataset file not found: {path}")
    gsm8k_style = spec.startswith("gsm8k")
    examples: list[Example] = []
    for lineno, row in iter_json_rows(path):
        if question_field is None and answer_field is None and _is_code_row(row):
            examples.append(_code_example(row, path, lineno))
            if limit is not None and len(examples) >= limit:
                break
            continue
        q = row.get(qf)
        if q is None and question_field is None:  # a user jsonl may call it either
            q = row.get("problem", row.get("question", row.get("prompt")))
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


# ---------------------------------------------------------------------------------------------- code prompts


def mbpp_prompt(text: str, first_assert: str) -> str:
    """An MBPP task as an MBPP+ evaluation question: MBPP+'s ``prompt`` is ``\"\"\"\\n<description>\\n<one
    assert>\\n\"\"\"\\n`` and the evaluation asks it stripped, followed by the code instruction."""
    return f'"""\n{text.strip()}\n{first_assert.strip()}\n"""'


def _is_code_row(row: dict) -> bool:
    """A code prompt: a description plus tests or reference code (MBPP or HumanEval style)."""
    has_text = any(isinstance(row.get(k), str) for k in ("prompt", "text", "question", "problem"))
    has_code = any(k in row for k in ("test_list", "test", "assertion", "code", "canonical_solution"))
    return has_text and has_code and "answer" not in row


def _str_list(value, path: Path, lineno: int, name: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DataError(f"{path}:{lineno}: field '{name}' must be a list of strings")
    return tuple(v.strip() for v in value if v.strip())


def _text_field(row: dict, key: str, path: Path, lineno: int) -> str | None:
    value = row.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise DataError(f"{path}:{lineno}: field '{key}' must be text, got {type(value).__name__}")
    return value.replace("\r\n", "\n")


def _code_example(row: dict, path: Path, lineno: int) -> Example:
    """A code row as an :class:`Example`: MBPP style (``text``, ``test_list``, ``code``; its question built
    like an MBPP+ prompt from the description and the first assert) or prompt style (``prompt`` asked as
    is, e.g. HumanEval or MBPP+ rows, or any jsonl of code prompts)."""
    field = lambda key: _text_field(row, key, path, lineno)  # noqa: E731
    asserts = _str_list(row.get("test_list"), path, lineno, "test_list")
    imports = _str_list(row.get("test_imports"), path, lineno, "test_imports")
    setup = (field("test_setup_code") or "").strip()
    prompt = next((v for k in ("prompt", "question", "problem") if (v := field(k)) is not None), None)
    if prompt is None:  # MBPP style: the description plus the first assert, as MBPP+ phrases it
        text = field("text") or ""
        if not text.strip():
            raise DataError(f"{path}:{lineno}: missing or empty text field 'text'")
        if not asserts:
            raise DataError(f"{path}:{lineno}: an MBPP-style row (field 'text') needs a non-empty 'test_list'")
        question = mbpp_prompt(text, asserts[0])
    else:
        question = prompt.strip()
        if not question:
            raise DataError(f"{path}:{lineno}: missing or empty text field 'prompt'")
    reference = field("code") or field("solution")
    if reference is None and (body := field("canonical_solution")) is not None:
        reference = prompt.rstrip() + "\n" + body if prompt and not _defines_function(body) else body
    test, entry = field("test") or field("assertion"), row.get("entry_point")  # HumanEval's test, MBPP+'s assertion
    if not asserts and test and test.strip():
        if "def check(" in test and isinstance(entry, str) and entry.strip():
            setup, asserts = (setup + "\n" + test.strip()).strip(), (f"check({entry.strip()})",)
        else:
            asserts = (test.strip(),)
    tests = CodeTests(asserts, setup, imports) if asserts else None
    ex_id = row.get("task_id", row.get("id"))
    if isinstance(ex_id, int) and not isinstance(ex_id, bool) and prompt is None:
        ex_id = f"Mbpp/{ex_id}"  # MBPP's integer task ids, named as EvalPlus names them
    ex_id = str(ex_id) if ex_id is not None and not isinstance(ex_id, (dict, list)) else f"{path.stem}-{lineno}"
    return Example(
        id=ex_id,
        question=question,
        answer="",
        reference=(reference or "").strip() or None,
        instruction=CODE_INSTRUCTION,
        tests=tests,
    )


def _defines_function(code: str) -> bool:
    return re.search(r"^(?:async\s+)?def\s", code, re.MULTILINE) is not None


def parse_mbpp_spec(spec: str) -> tuple[str, ...]:
    """``mbpp`` -> the default splits; ``mbpp:train+validation`` -> those splits, in MBPP's order."""
    _, _, tail = spec.partition(":")
    names = [s.strip() for s in tail.split("+")] if tail.strip() else list(MBPP_DEFAULT_SPLITS)
    bad = [n for n in names if n not in MBPP_SPLITS]
    if bad or not names:
        raise DataError(
            f"dataset {spec!r}: unknown MBPP split {bad[0] if bad else ''!r}; use mbpp or mbpp:<split>+<split> "
            f"with splits {', '.join(MBPP_SPLITS)}"
        )
    return tuple(n for n in MBPP_SPLITS if n in names)


def load_mbpp(spec: str = "mbpp", limit: int | None = None) -> list[Example]:
    """MBPP prompts of the chosen splits (default train + validation), without every task MBPP+
    evaluates (MBPP+ draws from all splits) and without the five tasks MBPP+ evaluates under another
    number (:data:`MBPP_NEAR_DUPLICATES`): 312 of the 464 train + validation tasks remain."""
    splits = parse_mbpp_spec(spec)
    root = shared_data_dir()
    path = root / MBPP_FILE
    if not path.is_file():
        raise DataError(f"dataset file not found: {path}")
    held_out = eval_task_ids(str(root)).get("mbppplus")
    if held_out is None:
        raise DataError(f"dataset {spec!r} excludes the MBPP+ tasks, but {root / EVAL_ID_FILES['mbppplus']} is missing")
    examples: list[Example] = []
    for lineno, row in iter_json_rows(path):
        number = row.get("task_id")
        if not isinstance(number, int) or isinstance(number, bool):
            raise DataError(f"{path}:{lineno}: 'task_id' must be an integer, got {number!r}")
        if (
            f"Mbpp/{number}" in held_out
            or number in MBPP_NEAR_DUPLICATES
            or not any(lo <= number <= hi for lo, hi in (MBPP_SPLITS[s] for s in splits))
        ):
            continue
        if not _is_code_row(row) or "text" not in row:
            raise DataError(f"{path}:{lineno}: not an MBPP row (needs 'text', 'test_list' and 'code')")
        examples.append(_code_example(row, path, lineno))
        if limit is not None and len(examples) >= limit:
            break
    if not examples:
        raise DataError(f"{path}: no examples in splits {'+'.join(splits)} outside MBPP+")
    return examples


# ---------------------------------------------------------------------------------------------- evaluation overlap


@lru_cache(maxsize=4)
def eval_task_ids(root: str) -> dict[str, frozenset[str]]:
    """The task ids of each evaluation set found under the data folder ``root`` (sets not present are left out)."""
    out: dict[str, frozenset[str]] = {}
    for name, rel in EVAL_ID_FILES.items():
        path = Path(root) / rel
        if path.is_file():
            out[name] = frozenset(str(row.get("task_id")) for _, row in iter_json_rows(path))
    return out


def canonical_task_id(ex_id: str) -> str:
    """``mbpp/12``, ``MBPP_12``, ``Mbpp-12`` -> ``Mbpp/12``; ``humaneval/3`` -> ``HumanEval/3``; others unchanged."""
    m = re.fullmatch(r"\s*(mbpp|humaneval)\s*[/_:-]?\s*(\d+)\s*", ex_id, re.IGNORECASE)
    if not m:
        return ex_id
    return f"{'Mbpp' if m.group(1).lower() == 'mbpp' else 'HumanEval'}/{int(m.group(2))}"


def eval_overlap(examples: list[Example]) -> dict[str, list[str]]:
    """Evaluation set -> the ids of ``examples`` it also holds (sorted; empty sets left out)."""
    try:
        root = shared_data_dir()
    except DataError:
        return {}  # no shared folder: no evaluation set to protect
    ids = {canonical_task_id(ex.id) for ex in examples}
    natural = lambda i: (i.rsplit("/", 1)[0], int(i.rsplit("/", 1)[1]) if i.rsplit("/", 1)[-1].isdigit() else -1, i)  # noqa: E731
    found = {name: sorted(ids & held, key=natural) for name, held in eval_task_ids(str(root)).items()}
    return {name: hits for name, hits in found.items() if hits}


def check_eval_overlap(examples: list[Example], spec: str, allow: bool = False) -> None:
    """Refuse a training set that shares task ids with an evaluation set, unless ``allow``."""
    overlap = eval_overlap(examples)
    if not overlap or allow:
        return
    total = sum(len(v) for v in overlap.values())
    parts = ", ".join(f"{len(v)} with {name} (e.g. {v[0]})" for name, v in overlap.items())
    raise DataError(
        f"training data {spec} shares {total} task_ids with evaluation sets ({parts}); "
        f"remove them, or set {OVERLAP_OVERRIDE} to train on them anyway"
    )


def load_train_examples(spec: str, *, allow_eval_overlap: bool = False, limit: int | None = None) -> list[Example]:
    """:func:`load_examples` for training: the set is checked against the evaluation sets (see
    :func:`check_eval_overlap`) before anything trains on it."""
    examples = load_examples(spec, limit=limit)
    check_eval_overlap(examples, spec, allow=allow_eval_overlap)
    return examples


# ---------------------------------------------------------------------------------------------- the prompt stream


class PromptStream:
    """Seeded, epoch-based order over the training prompts; its position is part of a checkpoint."""

    def __init__(self, examples: list[Example], batch_size: int, seed: int, shuffle: bool = True):
        self.examples, self.batch_size, self.seed, self.shuffle = examples, batch_size, seed, shuffle
        self.epoch, self.cursor = 0, 0
        self._order = self._make_order()

    @classmethod
    def from_config(cls, cfg, examples: list[Example] | None = None) -> "PromptStream":
        """The run's stream: ``optim.prompts_per_step`` prompts a step, in the order ``seed`` and
        ``data.shuffle`` give, over ``examples`` (default: the training set, checked for evaluation overlap)."""
        if examples is None:
            examples = load_train_examples(cfg.data.train, allow_eval_overlap=cfg.data.allow_eval_overlap)
        return cls(examples, cfg.optim.prompts_per_step, cfg.seed, cfg.data.shuffle)

    def _make_order(self) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.examples)))
        import torch

        g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
        return torch.randperm(len(self.examples), generator=g).tolist()

    def next_batch(self) -> list[Example]:
        out: list[Example] = []
        while len(out) < self.batch_size:
            if self.cursor >= len(self._order):
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._make_order()
            out.append(self.examples[self._order[self.cursor]])
            self.cursor += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._make_order()

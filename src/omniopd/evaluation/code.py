"""Grade model-written code on HumanEval and MBPP+, and compute pass@k.

Datasets (read from the shared data folder, :func:`omniopd.data.shared_data_dir`):
``humaneval/HumanEval.jsonl.gz`` (164 problems) and ``mbppplus/MbppPlus.jsonl`` (378 problems, the
EvalPlus release). A malformed row raises :class:`~omniopd.errors.DataError` naming file and line.

What a completion is graded on:

* **HumanEval**: the program ``prompt + completion + test + check(entry_point)``, as in the official
  harness. A completion that defines ``entry_point`` itself (what chat models write) goes after the
  whole prompt, so the prompt's imports and helper functions stay available; otherwise it is taken
  as the continuation of the prompt (a function body) and cut at the official stop sequences.
* **MBPP+**: the EvalPlus differential test. The expected outputs are those of ``prompt +
  canonical_solution`` on ``base_input`` then ``plus_input`` (inputs deserialized as EvalPlus does:
  JSON lists become tuples, sets or complex numbers for the tasks that take those), computed in the
  same sandboxed process just before the completion runs. Outputs are compared as EvalPlus does:
  ``==``, EvalPlus's special oracles (set equality for eight tasks, "not None" for three, bespoke
  checks for Mbpp/558 and Mbpp/581), and for float outputs an ``allclose`` with the task's ``atol``
  (1e-6 when the task gives 0) and rtol 1e-7. Each input gets ``max(1 s, 4 x the reference time)``,
  as in EvalPlus. Grading stops at the first failing input; ``base_passed`` says whether the original
  MBPP inputs all passed, which is the MBPP (base) score.

A completion is a model's answer as a string; :func:`extract_code` pulls the code out of it (fenced
blocks, a ``</think>`` prefix, surrounding prose). Nothing here generates text.

What is guaranteed: each program runs in :mod:`omniopd.evaluation.sandbox` (its docstring says what
that contains), one bad completion (a crash, a hang, a memory bomb) fails only itself, and the
canonical solutions of every problem pass (``tests/test_code_grading.py``). What is not: a
completion written to subvert the harness that shares its interpreter can forge a pass; these scores
measure honest code, not adversarial code.
"""

from __future__ import annotations

import ast
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from omniopd.data import iter_json_rows
from omniopd.errors import DataError
from omniopd.evaluation.sandbox import (
    SandboxLimits,
    SandboxResult,
    parallel_map,
    run_python,
)

__all__ = [
    "BENCHMARKS",
    "DEFAULT_LIMITS",
    "CodeGrade",
    "CodeTask",
    "assemble_program",
    "extract_code",
    "grade_code",
    "grade_many",
    "humaneval_program",
    "load_code_tasks",
    "mbppplus_program",
    "mean_pass_at_k",
    "normalize_benchmark",
    "pass_at_k",
    "pass_at_k_by_task",
    "sanitize_code",
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

# Per-program limits (backstops: a completion that hangs fails on its first input after ~1 s). MBPP+
# runs the reference and then the completion in one process: Mbpp/599's reference alone takes ~40 s
# and Mbpp/255 holds two ~1.1 GB outputs at once, hence 120 s and 4 GiB (EvalPlus's memory limit).
DEFAULT_LIMITS = {
    "humaneval": SandboxLimits(timeout=15.0, memory_mb=1024),
    "mbppplus": SandboxLimits(timeout=120.0, memory_mb=4096),
}

# EvalPlus's per-input time limit: max(MIN_TIME_LIMIT, TIME_FACTOR * reference time).
MIN_TIME_LIMIT = 1.0
TIME_FACTOR = 4.0

# The official HumanEval stop sequences, applied to a completion that continues the prompt.
HUMANEVAL_STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")

_GRADE_MARKER = "OMNIOPD_GRADE "


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


# --------------------------------------------------------------------------------------------------
# Extracting code from a model's answer.

_FENCE = re.compile(r"^[ \t]*```[ \t]*([\w+#.-]*)[^\n]*\n(.*?)(?:^[ \t]*```[ \t]*$|\Z)", re.MULTILINE | re.DOTALL)
_PYTHON_TAGS = {"", "python", "py", "python3", "py3"}
_CODE_START = re.compile(r"^(?:def |async def |class |import |from \S+ import |@)", re.MULTILINE)


def extract_code(answer: str, entry_point: str | None = None, *, sanitize: bool = True) -> str:
    """The code in a model's answer.

    Drops everything up to the last ``</think>``. With fenced blocks: the Python (or untagged)
    blocks; when ``sanitize``, each block that parses is reduced to its imports and definitions and
    the blocks are joined in order (later definitions win), so "example usage" blocks and test calls
    drop out; when no block defines ``entry_point``, the longest block as is. Without fences: the
    text itself, if it parses; a continuation of a prompt (an indented body) cut at the HumanEval
    stop sequences; else the code from its first ``def``/``import`` line, trimmed at the end until it
    parses.
    """
    text = answer
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    blocks = [(m.group(1).lower(), m.group(2)) for m in _FENCE.finditer(text)]
    if blocks:
        python = [body for tag, body in blocks if tag in _PYTHON_TAGS] or [body for _, body in blocks]
        if sanitize:
            parts = [sanitize_code(body) for body in python if _parses(body)]
            parts = [p for p in parts if p.strip()]
            joined = "\n\n".join(parts)
            if parts and (entry_point is None or _defines(joined, entry_point)):
                return joined.rstrip() + "\n"
        else:
            defining = [b for b in python if entry_point is not None and _defines(b, entry_point)]
            if defining:
                return defining[-1].rstrip() + "\n"
        return _strip_blank_lines(max(python, key=len)).rstrip() + "\n"
    body = _strip_blank_lines(text).rstrip()
    if not body:
        return ""
    if _parses(body):
        return (sanitize_code(body) if sanitize else body).rstrip() + "\n"
    if body[:1] in (" ", "\t"):
        return _cut_at_stops(body).rstrip() + "\n"
    m = _CODE_START.search(body)
    if m:
        lines = body[m.start():].splitlines()
        for end in range(len(lines), 0, -1):
            candidate = "\n".join(lines[:end])
            if _parses(candidate):
                return (sanitize_code(candidate) if sanitize else candidate).rstrip() + "\n"
    return body + "\n"


def _strip_blank_lines(text: str) -> str:
    lines = text.splitlines()
    while lines and not lines[0].strip():
        lines.pop(0)
    return "\n".join(lines)


def _cut_at_stops(text: str) -> str:
    cut = len(text)
    for stop in HUMANEVAL_STOP:
        i = text.find(stop)
        if i >= 0:
            cut = min(cut, i)
    return text[:cut]


def _parses(code: str) -> bool:
    try:
        ast.parse(code)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return False
    return True


def _defines(code: str, name: str) -> bool:
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return re.search(rf"^(?:async\s+)?def\s+{re.escape(name)}\s*\(", code, re.MULTILINE) is not None
    return any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n.name == name
               for n in tree.body) or any(
        isinstance(n, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in n.targets)
        for n in tree.body)


def _is_setup(node: ast.stmt) -> bool:
    """``sys.setrecursionlimit(...)``, or ``try: import ...`` (with any fallback)."""
    if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
        func = node.value.func
        return isinstance(func, ast.Attribute) and func.attr == "setrecursionlimit"
    if isinstance(node, ast.Try):
        return bool(node.body) and all(isinstance(n, (ast.Import, ast.ImportFrom)) for n in node.body)
    return False


def sanitize_code(code: str) -> str:
    """Keep the top-level imports (``try: import ...`` blocks included), function and class
    definitions, ``sys.setrecursionlimit(...)`` and the assignments the definitions use
    (``MOD = 10**9 + 7``); drop the rest (tests, prints, ``if __name__ == '__main__'``). Code that does
    not parse is returned unchanged."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return code
    lines = code.splitlines()
    defs = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    keep: set[int] = set()
    used: set[str] = set()

    def names_in(node: ast.AST) -> set[str]:
        return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}

    for i, node in enumerate(tree.body):
        if isinstance(node, (ast.Import, ast.ImportFrom, *defs)) or _is_setup(node):
            keep.add(i)
            if isinstance(node, (*defs, ast.Try)):
                used |= names_in(node)
    assigns = {i: node for i, node in enumerate(tree.body)
               if isinstance(node, (ast.Assign, ast.AnnAssign)) and getattr(node, "value", None) is not None}
    changed = True
    while changed:
        changed = False
        for i, node in assigns.items():
            if i in keep:
                continue
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            bound = set().union(*(names_in(t) for t in targets))
            if bound & used and node.value is not None:
                keep.add(i)
                used |= names_in(node.value)
                changed = True
    out = []
    for i, node in enumerate(tree.body):
        if i not in keep:
            continue
        start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        end = node.end_lineno or node.lineno
        out.append("\n".join(lines[start - 1:end]))
    return "\n\n".join(out) + ("\n" if out else "")


# --------------------------------------------------------------------------------------------------
# Program assembly.


def humaneval_program(task: CodeTask, code: str) -> str:
    """``prompt + completion + test + check(entry_point)``; a completion that defines the entry point
    goes after the whole prompt (a function with only a docstring is valid Python)."""
    if task.test is None:
        raise ValueError(f"{task.task_id} has no test")
    if _defines(code, task.entry_point):
        body = task.prompt.rstrip() + "\n\n\n" + code
    else:
        body = task.prompt + code
    return f"{body.rstrip()}\n\n\n{task.test.rstrip()}\n\n\ncheck({task.entry_point})\n"


# Tasks whose JSON inputs EvalPlus turns back into tuples, sets or complex numbers (by task number).
_DESERIALIZE: dict[int, str] = {}
for _kind, _ids in {
    "tuple_args": (2, 116, 132, 143, 222, 261, 273, 394, 399, 421, 424, 429, 470, 560, 579, 596, 616, 630,
                   726, 740, 744, 809),
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

_MBPP_HARNESS = r'''
import copy as _copy, json as _json, linecache as _linecache, math as _math, os as _os
import reprlib as _reprlib, signal as _signal, sys as _sys, time as _time

_SPEC = _json.loads(__SPEC__)
_ENTRY = _SPEC["entry_point"]
_OUT = _sys.stdout
_NOT_NONE = {"check_str", "text_match_three", "text_starta_endb"}
_SET_EQ = {"similar_elements", "find_char_long", "common_in_nested_lists", "extract_singly", "larg_nnum",
           "intersection_array", "find_dissimilar", "Diff"}
_REPR = _reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 120
_REPR.maxlist = _REPR.maxtuple = _REPR.maxset = _REPR.maxdict = 8


def _report(**fields):
    _sys.stdout, _sys.stderr = _OUT, _sys.__stderr__
    _OUT.write("\n__MARKER__" + _json.dumps(fields) + "\n")
    _OUT.flush()


def _short(value):
    try:
        return _REPR.repr(value)
    except BaseException as exc:
        return "<unprintable %s: %s>" % (type(value).__name__, type(exc).__name__)


def _deep_tuple(x):
    return tuple(_deep_tuple(i) for i in x) if isinstance(x, list) else x


def _deserialize(kind, inputs):
    if kind == "tuple_args":
        return [[tuple(a) for a in inp] for inp in inputs]
    if kind == "tuple_items":
        return [[[tuple(x) for x in a] for a in inp] for inp in inputs]
    if kind == "first_arg_tuple_items":
        return [[[tuple(x) for x in inp[0]]] + inp[1:] for inp in inputs]
    if kind == "second_arg_tuple":
        return [[inp[0], tuple(inp[1])] + inp[2:] for inp in inputs]
    if kind == "first_arg_sets":
        return [[[set(i) if isinstance(i, list) and i else {} for i in inp[0]]] for inp in inputs]
    if kind == "float_complex":
        return [(float(inp[0]), complex(inp[1])) for inp in inputs]
    if kind == "first_arg_tuple":
        return [[tuple(inp[0])] + inp[1:] for inp in inputs]
    if kind == "tuple_of_tuples":
        return [[tuple(tuple(x) for x in a) for a in inp] for inp in inputs]
    if kind == "first_arg_nested_tuple":
        return [[tuple(tuple(i) if isinstance(i, list) else i for i in inp[0])] for inp in inputs]
    if kind == "dict_tuple_values":
        return [[{k: tuple(v) for k, v in inp[0].items()}] + inp[1:] for inp in inputs]
    if kind == "complex":
        return [[complex(inp[0])] for inp in inputs]
    if kind == "deep_tuple":
        return [_deep_tuple(inp) for inp in inputs]
    return inputs


def _surface_area(base_edge, height):  # EvalPlus oracle for Mbpp/581
    slant = _math.sqrt((base_edge / 2) ** 2 + height ** 2)
    return round(base_edge ** 2 + 4 * (base_edge * slant) / 2)


def _digit_distance(num1, num2):  # EvalPlus oracle for Mbpp/558
    a, b = str(num1), str(num2)
    width = max(len(a), len(b))
    return sum(abs(int(x) - int(y)) for x, y in zip(a.zfill(width), b.zfill(width)))


def _is_floats(x):
    if isinstance(x, float):
        return True
    if isinstance(x, (list, tuple)) and x:
        return all(isinstance(i, float) for i in x)
    return False


def _close(a, b, rtol, atol):  # numpy.allclose on nested sequences of numbers
    seq = (list, tuple)
    if isinstance(a, seq) or isinstance(b, seq):
        if isinstance(a, seq) and isinstance(b, seq):
            return len(a) == len(b) and all(_close(x, y, rtol, atol) for x, y in zip(a, b))
        if isinstance(a, seq):
            return all(_close(x, b, rtol, atol) for x in a)
        return all(_close(a, y, rtol, atol) for y in b)
    number = (int, float, complex)
    if not isinstance(a, number) or not isinstance(b, number):
        return False
    if a == b:
        return True
    try:
        return abs(a - b) <= atol + rtol * abs(b)
    except (OverflowError, TypeError):
        return False


def _check(inp, out, exp, atol):
    exact = out == exp
    if _ENTRY == "are_equivalent":
        exact = True
    elif _ENTRY == "sum_div":
        exact = exact or out == 0
    elif _ENTRY == "surface_Area":
        exact = exact or abs(out - _surface_area(*inp)) <= atol
    elif _ENTRY == "digit_distance_nums":
        exact = exact or out == _digit_distance(*inp)
    elif _ENTRY in _SET_EQ:
        exact = set(out) == set(exp)
    elif _ENTRY in _NOT_NONE:
        exact = out == exp if isinstance(out, bool) else exp == (out is not None)
    if atol == 0 and _is_floats(exp):
        atol = 1e-6
    if not exact and atol != 0:
        if type(out) is not type(exp):
            return False
        if isinstance(exp, (list, tuple)) and len(out) != len(exp):
            return False
        return _close(out, exp, 1e-07, atol)
    return bool(exact)


class _Timeout(BaseException):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def _timed(limit, fn, *args):
    _signal.setitimer(_signal.ITIMER_REAL, limit)
    try:
        return fn(*args)
    finally:
        _signal.setitimer(_signal.ITIMER_REAL, 0)


def _load(code, name):
    filename = "<%s>" % name
    _linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
    env = {"__name__": name, "__builtins__": __builtins__}
    exec(compile(code, filename, "exec"), env)
    return env


def _fail(split, index, reason, message, inp=None, **extra):
    _report(passed=False, base_passed=(split == "plus"), split=split, index=index, reason=reason,
            message=message, input=None if inp is None else _short(inp), **extra)
    raise SystemExit(1)


def _main():
    _signal.signal(_signal.SIGALRM, _alarm)
    kind = _SPEC["deserialize"]
    splits = [("base", _deserialize(kind, _SPEC["base_input"])), ("plus", _deserialize(kind, _SPEC["plus_input"]))]
    try:
        reference = _load(_SPEC["reference"], "reference")[_ENTRY]
        expected = {}
        for split, inputs in splits:
            outs, times = [], []
            for inp in inputs:
                start = _time.perf_counter()
                outs.append(reference(*_copy.deepcopy(inp)))
                times.append(_time.perf_counter() - start)
            if _ENTRY in _NOT_NONE:
                outs = [o is not None for o in outs]
            expected[split] = (outs, times)
    except BaseException as exc:
        _report(passed=False, base_passed=False, reason="error",
                message="the reference solution failed: %s: %s" % (type(exc).__name__, _short(exc)))
        raise SystemExit(3)

    try:
        sink = open(_os.devnull, "w")
    except OSError:
        sink = None
    if sink is not None:
        _sys.stdout = _sys.stderr = sink
    try:
        candidate = _load(_SPEC["candidate"], "completion")
    except BaseException as exc:
        _fail("base", None, "exception", "the completion failed to load: %s: %s" % (type(exc).__name__, _short(exc)))
    fn = candidate.get(_ENTRY)
    if not callable(fn):
        _fail("base", None, "missing", "the completion does not define a function %s()" % _ENTRY)
    for split, inputs in splits:
        outs, times = expected[split]
        for i, inp in enumerate(inputs):
            limit = max(_SPEC["min_time_limit"], _SPEC["time_factor"] * times[i])
            try:
                out = _timed(limit, fn, *_copy.deepcopy(inp))
                ok = _timed(limit, _check, inp, out, outs[i], _SPEC["atol"])
            except _Timeout:
                _fail(split, i, "timeout", "time limit of %.2fs exceeded" % limit, inp)
            except BaseException as exc:
                _fail(split, i, "exception", "%s: %s" % (type(exc).__name__, _short(exc)), inp)
            if not ok:
                _fail(split, i, "wrong", "wrong output", inp, expected=_short(outs[i]), got=_short(out))
    _report(passed=True, base_passed=True, tests=sum(len(inputs) for _, inputs in splits))


_main()
'''


def mbppplus_program(task: CodeTask, code: str, *, min_time_limit: float = MIN_TIME_LIMIT,
                     time_factor: float = TIME_FACTOR) -> str:
    """A self-contained program that computes the reference outputs, runs ``code`` on every base and
    plus input and prints an ``OMNIOPD_GRADE {json}`` verdict line."""
    number = _task_number(task.task_id)
    spec = {
        "entry_point": task.entry_point,
        "reference": task.prompt + task.canonical_solution,
        "candidate": code,
        "base_input": task.base_input,
        "plus_input": task.plus_input,
        "atol": task.atol,
        "deserialize": _DESERIALIZE.get(number or -1, "none"),
        "min_time_limit": min_time_limit,
        "time_factor": time_factor,
    }
    payload = json.dumps(spec)
    return _MBPP_HARNESS.replace("__MARKER__", _GRADE_MARKER).replace("__SPEC__", repr(payload), 1)


def assemble_program(task: CodeTask, code: str) -> str:
    if task.benchmark == "humaneval":
        return humaneval_program(task, code)
    if task.benchmark == "mbppplus":
        return mbppplus_program(task, code)
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


def grade_code(benchmark: str, task: CodeTask | str, completion: str, *, extract: bool = True,
               limits: SandboxLimits | None = None) -> CodeGrade:
    """Grade one completion (a model's answer, or code when ``extract=False``) on one task."""
    bench = normalize_benchmark(benchmark)
    t = _resolve_task(bench, task)
    code = extract_code(completion, t.entry_point) if extract else completion
    result = run_python(assemble_program(t, code), limits or DEFAULT_LIMITS[bench])
    return _to_grade(t, code, result)


def grade_many(benchmark: str, items: Iterable[tuple[CodeTask | str, str]], *, extract: bool = True,
               limits: SandboxLimits | None = None, max_workers: int | None = None) -> list[CodeGrade]:
    """Grade (task, completion) pairs, at most ``max_workers`` at a time (default: one per core);
    results in input order."""
    bench = normalize_benchmark(benchmark)
    pairs = [(_resolve_task(bench, task), completion) for task, completion in items]
    return parallel_map(lambda pair: grade_code(bench, pair[0], pair[1], extract=extract, limits=limits),
                        pairs, max_workers)


def _to_grade(task: CodeTask, code: str, result: SandboxResult) -> CodeGrade:
    if task.benchmark == "humaneval":
        return CodeGrade(task.task_id, result.passed, result.status, result.detail, result.seconds, None, code)
    verdict = None
    for line in reversed(result.stdout.splitlines()):
        if line.startswith(_GRADE_MARKER):
            try:
                verdict = json.loads(line[len(_GRADE_MARKER):])
            except json.JSONDecodeError:
                verdict = None
            break
    if verdict is None:
        status = result.status if result.status != "passed" else "error"
        detail = result.detail or "the grading harness gave no verdict"
        return CodeGrade(task.task_id, False, status, detail, result.seconds, False, code)
    passed = bool(verdict.get("passed")) and result.passed
    if passed:
        return CodeGrade(task.task_id, True, "passed", "", result.seconds, True, code)
    reason = verdict.get("reason")
    status = {"timeout": "timeout", "error": "error"}.get(reason, "failed")
    if result.status in ("timeout", "killed", "error"):
        status = result.status
    where = ""
    if verdict.get("split") is not None and verdict.get("index") is not None:
        where = f"{verdict['split']} input #{verdict['index']}: "
    parts = [where + str(verdict.get("message", ""))]
    for key in ("input", "expected", "got"):
        if verdict.get(key) is not None:
            parts.append(f"{key}: {verdict[key]}")
    return CodeGrade(task.task_id, False, status, "\n".join(parts), result.seconds,
                     bool(verdict.get("base_passed")), code)


# --------------------------------------------------------------------------------------------------
# pass@k.


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem from ``n`` samples of which ``c`` passed (Chen et al., 2021):
    ``1 - C(n-c, k) / C(n, k)``, computed as ``1 - prod_{i=n-c+1..n} (1 - k/i)``."""
    for name, value in (("n", n), ("c", c), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {value!r}")
    if n < 1 or k < 1:
        raise ValueError(f"need n >= 1 and k >= 1, got n={n}, k={k}")
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got c={c}, n={n}")
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got n={n}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def mean_pass_at_k(counts: Iterable[tuple[int, int]], k: int) -> float:
    """Mean pass@k over problems given as ``(n, c)`` pairs."""
    values = [pass_at_k(n, c, k) for n, c in counts]
    if not values:
        raise ValueError("no problems")
    return sum(values) / len(values)


def pass_at_k_by_task(grades: Sequence[CodeGrade], k: int) -> float:
    """Mean pass@k of graded samples, grouped by task_id."""
    counts: dict[str, list[int]] = {}
    for g in grades:
        nc = counts.setdefault(g.task_id, [0, 0])
        nc[0] += 1
        nc[1] += int(g.passed)
    return mean_pass_at_k(((n, c) for n, c in counts.values()), k)

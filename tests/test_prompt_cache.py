"""Prompt caching: breakpoints placed for Anthropic, each provider's minimum cacheable length, the usage fields
counted by the ledger and priced by hand, the cost cap on cached pricing, and adaptive rounds that read the
re-sent prompt. Everything runs against the local fake providers through the official SDKs."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
import torch

from conftest import char_tokenizer, tiny_llama
from omniopd.errors import ConfigError, TeacherError
from omniopd.teachers.anthropic_backend import AnthropicTeacher
from omniopd.teachers.base import ContinuationRequest, SamplingSpec, Teacher
from omniopd.teachers.gemini_backend import GeminiTeacher
from omniopd.teachers.ledger import BudgetLedger
from omniopd.teachers.openai_backend import OpenAICompletionsTeacher, usage_counts
from omniopd.teachers.prices import Prices, resolve_prices
from omniopd.teachers.prompt_cache import EPHEMERAL, PrefixRegistry, approx_tokens, shape_prefill
from omniopd.testing.fake_providers import FakeProviderServer

FAST = {"backoff_base_s": 0.01, "backoff_max_s": 0.05, "max_retries": 1, "timeout_s": 10.0, "cache_path": None}
# prices that make every rate visible: input 1, output 5, cached 0.1, write 1.25 (Claude Haiku 4.5's list prices)
HAIKU = {"price_input_per_mtok": 1.0, "price_output_per_mtok": 5.0, "price_cached_input_per_mtok": 0.1,
         "price_cache_write_per_mtok": 1.25}


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeProviderServer]:
    for name in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GEMINI_API_KEY"):
        monkeypatch.setenv(name, "sk-test")
    with FakeProviderServer() as server:
        yield server


def anthropic(fake: FakeProviderServer, model: str = "fake-claude", **kw) -> AnthropicTeacher:
    return AnthropicTeacher(model, base_url=fake.url, dispatch="sequential", **{**FAST, **kw})


def blocks(content) -> list[tuple[str, bool]]:
    """(text, carries a breakpoint) of each block of a message's content; a plain string is one unmarked block."""
    if isinstance(content, str):
        return [(content, False)]
    return [(b["text"], b.get("cache_control") == EPHEMERAL) for b in content]


# ---------------------------------------------------------------------------------------------------
# breakpoint placement (pure)


def test_breakpoints_go_on_the_latest_block_ends_that_reach_the_minimum():
    user = {"role": "user", "content": "u" * 40}  # 10 tokens (4 characters each)
    answer = {"role": "assistant", "content": "a" * 40 + " " + "b" * 19 + "\n" + "c" * 19}  # cut at 40 and 60
    # blocks: user 10 | "a"*40 10 | " b.." 5 | "\nc.." 5; cumulative 10, 20, 25, 30
    out = shape_prefill([user, answer], [40, 60], min_tokens=20)
    assert blocks(out[0]["content"]) == [("u" * 40, False)]
    assert blocks(out[1]["content"]) == [("a" * 40, True), (" " + "b" * 19, True), ("\n" + "c" * 19, True)]
    out = shape_prefill([user, answer], [40, 60], min_tokens=26)  # only the whole prompt reaches 26
    assert [m for _, m in blocks(out[1]["content"])] == [False, False, True]
    assert shape_prefill([user, answer], [40, 60], min_tokens=31) == [user, answer]  # nothing to cache: as is
    assert shape_prefill([user, answer], [0, 80, 99], min_tokens=1) == [  # cuts outside the answer are ignored
        {"role": "user", "content": [{"type": "text", "text": "u" * 40, "cache_control": EPHEMERAL}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer["content"], "cache_control": EPHEMERAL}]},
    ]
    # six eligible block ends: only the last four carry a breakpoint (the API's limit)
    long = {"role": "assistant", "content": "x" * 80}
    marks = [m for _, m in blocks(shape_prefill([user, long], [16, 32, 48, 64], min_tokens=1)[1]["content"])]
    assert marks == [False, True, True, True, True]


def test_the_registry_cuts_at_the_stripped_ends_of_shorter_prefixes_of_the_same_task():
    reg = PrefixRegistry()
    for body in ("We add", "We add 2 and 3", "We add 2 and 3 to get 5", "We subtract"):
        reg.add("task", body)
    reg.add("other task", "We")
    assert reg.boundaries("task", "We add 2 and 3 to get 5") == [6, 14]  # not itself, not another task's
    assert reg.boundaries("task", "We add 2 and 30") == [6, 14]
    assert reg.boundaries("task", "Wow") == [] and len(reg) == 5


# ---------------------------------------------------------------------------------------------------
# Anthropic end to end: one trajectory, its blocks and its usage, request by request

A, B, C = "a" * 40, "b" * 39, "c" * 39  # the chunk texts: 10 tokens each with the whitespace that opens B and C
QUESTION = "q" * 60  # 15 tokens: under the minimum of 16, so the task alone is never a breakpoint
TRAJECTORY = [
    ContinuationRequest(question=QUESTION, prefix=A + " ", trajectory=0, instruction=""),  # ends in a space
    ContinuationRequest(question=QUESTION, prefix=A + " " + B + "\n", trajectory=0, instruction=""),  # a newline
    ContinuationRequest(question=QUESTION, prefix=A + " " + B + "\n" + C + " ", trajectory=0, instruction=""),
]
SPEC = SamplingSpec(n=3, max_new_tokens=8)


def test_a_trajectory_writes_each_chunk_once_and_reads_the_rest(fake: FakeProviderServer):
    fake.cache_min_tokens = 16
    with anthropic(fake, prompt_cache_min_tokens=16, **HAIKU) as teacher:
        results = teacher.continue_prefixes(TRAJECTORY, SPEC)
        metrics = teacher.metrics()
    assert [r.error for r in results] == [None, None, None]  # the fake refuses a prefill ending in whitespace
    sent = fake.requests
    assert len(sent) == 9
    # every block ends in the text the shorter request ended with; the stripped whitespace opens the next block
    assert blocks(sent[0].body["messages"][1]["content"]) == [(A, True)]
    assert blocks(sent[3].body["messages"][1]["content"]) == [(A, True), (" " + B, True)]
    assert blocks(sent[6].body["messages"][1]["content"]) == [(A, True), (" " + B, True), ("\n" + C, True)]
    assert blocks(sent[6].body["messages"][0]["content"]) == [(QUESTION, False)]
    # (prompt, read, written) by hand: prompts of 25, 35 and 45 tokens; each chunk's first request reads the
    # previous chunk's entry and writes its own 10 new tokens, its other two read everything
    usage = [(u.prompt_tokens, u.cached_tokens, u.cache_write_tokens) for u in (r.usage for r in sent)]
    assert usage == [(25, 0, 25), (25, 25, 0), (25, 25, 0),
                     (35, 25, 10), (35, 35, 0), (35, 35, 0),
                     (45, 35, 10), (45, 45, 0), (45, 45, 0)]
    assert (metrics["teacher/tokens_in"], metrics["teacher/cached_tokens"], metrics["teacher/cache_write_tokens"]) == (
        315, 270, 45)
    assert metrics["teacher/tokens_out"] == 9 * 8  # 8 filler words per sample
    # 0 uncached x $1 + 270 read x $0.10 + 45 written x $1.25 + 72 generated x $5, per million
    assert metrics["teacher/cost_usd"] == pytest.approx((270 * 0.1 + 45 * 1.25 + 72 * 5.0) / 1e6)
    assert [r.prompt_tokens for r in results] == [75, 105, 135]


def test_the_response_cache_finds_a_request_whatever_prefixes_the_run_had_seen(fake: FakeProviderServer, tmp_path):
    """The blocks of a request depend on the shorter prefixes registered before it (earlier steps included); the
    response cache keys on the unshaped request, so a resumed run with an empty registry reads what was written."""
    fake.cache_min_tokens = 16
    cache = {**FAST, "cache_path": str(tmp_path / "responses.sqlite")}
    with anthropic(fake, prompt_cache_min_tokens=16, **cache) as teacher:
        first = teacher.continue_prefixes(TRAJECTORY, SPEC)
    assert blocks(fake.requests[6].body["messages"][1]["content"])[0] == (A, True)  # cut at the shorter prefixes
    sent = fake.count()
    with anthropic(fake, prompt_cache_min_tokens=16, **cache) as teacher:  # a new process: nothing registered
        again = teacher.continue_prefixes(TRAJECTORY[2:], SPEC)
        metrics = teacher.metrics()
    assert fake.count() == sent  # all three samples of the longest prefix came from the response cache
    assert metrics["teacher/cache_hits"] == 3
    assert again[0].texts == first[2].texts


def test_switched_off_nothing_is_marked_or_cached(fake: FakeProviderServer):
    fake.cache_min_tokens = 16
    with anthropic(fake, prompt_cache=False, prompt_cache_min_tokens=16) as teacher:
        teacher.continue_prefixes(TRAJECTORY, SPEC)
        metrics = teacher.metrics()
    assert all(isinstance(m["content"], str) for r in fake.requests for m in r.body["messages"])
    assert fake.requests[6].body["messages"][1]["content"] == A + " " + B + "\n" + C  # stripped, in one string
    assert metrics["teacher/cached_tokens"] == metrics["teacher/cache_write_tokens"] == 0
    assert metrics["teacher/tokens_in"] == 3 * (25 + 35 + 45)


def test_the_fake_refuses_what_the_messages_api_refuses(fake: FakeProviderServer):
    def post(messages) -> tuple[int, str]:
        body = json.dumps({"model": "m", "max_tokens": 4, "messages": messages}).encode()
        req = urllib.request.Request(fake.url + "/v1/messages", data=body, headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(req) as resp:
                return resp.status, ""
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())["error"]["message"]

    user = {"role": "user", "content": "q"}
    mark = {"cache_control": EPHEMERAL}
    assert post([user, {"role": "assistant", "content": "We add "}]) == (
        400, "messages: final assistant content cannot end with trailing whitespace")
    assert post([user, {"role": "assistant", "content": [{"type": "text", "text": " "}]}])[0] == 400
    five = [{"type": "text", "text": t, **mark} for t in "abcde"]
    assert post([user, {"role": "assistant", "content": five}]) == (
        400, "A maximum of 4 blocks with cache_control may be provided. Found 5.")
    assert post([user, {"role": "assistant", "content": five[:4]}]) == (200, "")


# ---------------------------------------------------------------------------------------------------
# the minimum cacheable length, per provider, at each model's documented value


def test_anthropic_places_no_breakpoint_under_the_models_minimum(fake: FakeProviderServer):
    """claude-haiku-4-5 caches from 4,096 tokens, claude-sonnet-4-5 from 1,024 (teachers.prices); the client
    and the fake both read the table."""
    short = ContinuationRequest(question=QUESTION, prefix="w" * 4 * 3000, instruction="")  # 3,015 tokens
    long = ContinuationRequest(question=QUESTION, prefix="w" * 4 * 4200, instruction="")  # 4,215 tokens
    spec = SamplingSpec(n=2, max_new_tokens=4)
    with anthropic(fake, "claude-haiku-4-5") as haiku:
        assert haiku.cache_min_tokens == 4096
        haiku.continue_prefixes([short], spec)
        assert all(isinstance(m["content"], str) for r in fake.requests for m in r.body["messages"])
        assert haiku.metrics()["teacher/cached_tokens"] == 0
        fake.clear()
        haiku.continue_prefixes([long], spec)
    assert [(u.prompt_tokens, u.cached_tokens, u.cache_write_tokens) for u in (r.usage for r in fake.requests)] == [
        (4215, 0, 4215), (4215, 4215, 0)]
    fake.clear()
    with anthropic(fake, "claude-sonnet-4-5-20250929") as sonnet:  # a dated snapshot of a known model
        assert sonnet.cache_min_tokens == 1024
        sonnet.continue_prefixes([short], spec)
    assert [r.usage.cached_tokens for r in fake.requests] == [0, 3015]
    with anthropic(fake, "fake-claude") as unknown, anthropic(fake, "fake-claude", prompt_cache_min_tokens=99) as mine:
        assert (unknown.cache_min_tokens, mine.cache_min_tokens) == (1024, 99)


def test_openai_caches_long_prompts_by_itself_in_steps_of_128(fake: FakeProviderServer):
    """gpt-5-mini: from 1,024 tokens, hits in increments of 128, the cached part in
    ``prompt_tokens_details.cached_tokens`` (included in ``prompt_tokens``)."""
    spec = SamplingSpec(n=2, max_new_tokens=4)

    def twice(prefix: str) -> tuple[int, list[int]]:
        fake.clear()
        with OpenAICompletionsTeacher("gpt-5-mini", base_url=fake.url + "/v1", **FAST) as t:
            for seed in (1, 2):  # the same prompt again (another draw)
                t.continue_prefixes([ContinuationRequest(question=QUESTION, prefix=prefix)], SamplingSpec(
                    n=spec.n, max_new_tokens=4, seed=seed))
            assert t.metrics()["teacher/cached_tokens"] == sum(r.usage.cached_tokens for r in fake.requests)
        return approx_tokens(fake.requests[0].body["prompt"]), [r.usage.cached_tokens for r in fake.requests]

    total, cached = twice("w" * 4 * 900)
    assert total < 1024 and cached == [0, 0]
    total, cached = twice("w" * 4 * 1500)
    assert cached == [0, 1024 + (total - 1024) // 128 * 128] and cached[1] > 1024
    # a longer prefix of the same answer reads the shorter one's prompt (the stable part comes first)
    with OpenAICompletionsTeacher("gpt-5-mini", base_url=fake.url + "/v1", **FAST) as t:
        t.continue_prefixes([ContinuationRequest(question=QUESTION, prefix="w" * 4 * 1500 + " and more")], spec)
    shared = len(fake.requests[0].body["prompt"]) // 4  # the whole shorter prompt is a prefix of this one
    assert fake.requests[-1].usage.cached_tokens == 1024 + (shared - 1024) // 128 * 128


def test_gemini_caches_implicitly_from_its_minimum(fake: FakeProviderServer):
    """gemini-2.5-flash: implicit caching from 2,048 tokens, ``cachedContentTokenCount`` in the usage."""
    def twice(prefix: str) -> list[int]:
        fake.clear()
        with GeminiTeacher("gemini-2.5-flash", base_url=fake.url, **FAST) as t:
            for seed in (1, 2):
                t.continue_prefixes([ContinuationRequest(question=QUESTION, prefix=prefix)],
                                    SamplingSpec(n=4, max_new_tokens=4, seed=seed))
            assert t.metrics()["teacher/cached_tokens"] == sum(r.usage.cached_tokens for r in fake.requests)
        return [r.usage.cached_tokens for r in fake.requests]

    assert twice("w" * 4 * 1500) == [0, 0]
    cached = twice("w" * 4 * 2500)
    text = "<|user|>" + fake.requests[0].body["contents"][0]["parts"][0]["text"]  # the prompt as one turn
    assert cached == [0, len(text) // 4] and cached[1] > 2048


def test_openai_usage_with_cache_writes_is_read_from_the_sdk_object():
    from openai.types import CompletionUsage
    from openai.types.completion_usage import PromptTokensDetails

    usage = CompletionUsage(prompt_tokens=3000, completion_tokens=40, total_tokens=3040,
                            prompt_tokens_details=PromptTokensDetails(cached_tokens=2048, cache_write_tokens=900))
    assert usage_counts(usage) == {"prompt_tokens": 3000, "completion_tokens": 40, "cached_tokens": 2048,
                                   "cache_write_tokens": 900}
    assert usage_counts(CompletionUsage(prompt_tokens=5, completion_tokens=1, total_tokens=6))["cached_tokens"] == 0


# ---------------------------------------------------------------------------------------------------
# the ledger, by hand


def test_ledger_prices_each_prompt_token_at_one_rate():
    ledger = BudgetLedger(1.0, 5.0, price_cached_input_per_mtok=0.1, price_cache_write_per_mtok=1.25)
    ledger.record_request()
    ledger.record_success(1_000, 50, 0.1, cached_tokens=600, cache_write_tokens=300)
    ledger.record_request()
    ledger.record_success(500, 50, 0.1, cached_tokens=500)
    snap = ledger.snapshot()
    assert (snap["teacher/tokens_in"], snap["teacher/cached_tokens"], snap["teacher/cache_write_tokens"]) == (
        1500, 1100, 300)
    # 100 uncached x 1 + 1,100 read x 0.1 + 300 written x 1.25 + 100 generated x 5 = 1,085 per million
    assert snap["teacher/cost_usd"] == pytest.approx(1085 / 1e6)
    # without cache prices a read or a write costs the input price: 1,500 x 1 + 100 x 5
    plain = BudgetLedger(1.0, 5.0)
    plain.record_success(1_000, 50, 0.1, 600, 300)
    plain.record_success(500, 50, 0.1, 500)
    assert plain.cost_usd == pytest.approx(2000 / 1e6)


def test_prices_come_from_the_table_and_options_override_them():
    assert resolve_prices("claude-haiku-4-5", "anthropic") == Prices(1.0, 5.0, 0.1, 1.25)
    assert resolve_prices("claude-haiku-4-5-20251001", "anthropic") == Prices(1.0, 5.0, 0.1, 1.25)
    assert resolve_prices("claude-haiku-4-5", "anthropic", input=2.0) == Prices(2.0, 5.0, 0.2, 2.5)  # its ratios
    assert resolve_prices("claude-haiku-4-5", "anthropic", cached_input=0.05).cached_input == 0.05
    assert resolve_prices("gemini-2.5-flash", "gemini") == Prices(0.3, 2.5, 0.03, 0.3)
    assert resolve_prices("gpt-5-mini", "openai") == Prices(0.25, 2.0, 0.025, 0.25)
    # unknown: Anthropic's multipliers hold for every model; OpenAI's and Gemini's discount is not assumed
    assert resolve_prices("claude-next", "anthropic", input=3.0) == Prices(3.0, 0.0, pytest.approx(0.3), 3.75)
    assert resolve_prices("my-model", "openai", input=2.0, output=8.0) == Prices(2.0, 8.0, 2.0, 2.0)
    assert not resolve_prices("my-model", "gemini").known


def test_a_cost_cap_without_any_price_is_refused(fake: FakeProviderServer):
    with pytest.raises(ConfigError, match=r"max_cost_usd needs prices: 'fake-claude' is not in the price table"):
        anthropic(fake, max_cost_usd=1.0)
    anthropic(fake, "claude-haiku-4-5", max_cost_usd=1.0).close()  # the table prices it


# ---------------------------------------------------------------------------------------------------
# the cost cap sees cached pricing


def test_the_cost_cap_stops_on_cached_reads_alone(fake: FakeProviderServer):
    fake.cache_min_tokens = 16
    only_reads = {"price_input_per_mtok": 0.0, "price_output_per_mtok": 0.0, "price_cached_input_per_mtok": 1e4,
                  "price_cache_write_per_mtok": 0.0}  # a cache read is the only thing that costs anything
    with anthropic(fake, prompt_cache_min_tokens=16, max_cost_usd=0.5, **only_reads) as teacher:
        with pytest.raises(TeacherError, match=r"max_cost_usd \$0\.5000 .*50 of them read from the prompt cache"):
            teacher.continue_prefixes(TRAJECTORY, SPEC)
        # chunk 1: a write (free), then two reads of 25 tokens at $0.01 each = $0.50; chunk 2 is never sent
        spent = teacher.metrics()
        assert spent["teacher/requests"] == 3 and spent["teacher/cost_usd"] == pytest.approx(0.5)
    fake.clear()
    with anthropic(fake, prompt_cache=False, prompt_cache_min_tokens=16, max_cost_usd=0.5, **only_reads) as teacher:
        teacher.continue_prefixes(TRAJECTORY, SPEC)  # nothing read from a cache: nothing billed, no stop
        assert teacher.metrics()["teacher/cost_usd"] == 0 and teacher.metrics()["teacher/requests"] == 9


# ---------------------------------------------------------------------------------------------------
# training: per-step keys, the cap stopping a run, adaptive rounds reading the re-sent prompt


def _train_cfg(tiny_model_dir, data, out, fake, **teacher):
    from test_train_tiny import _cfg

    base = _cfg(tiny_model_dir, data, out, {"type": "local"}).model_dump(mode="json")
    base["teacher"] = {"type": "anthropic", "model": "fake-claude", "base_url": fake.url, "api_key_env": "NO_KEY_SET",
                       "cache": False, "timeout_s": 10.0, "backoff_base_s": 0.01, "backoff_max_s": 0.05,
                       "prompt_cache_min_tokens": 4, "dispatch": "sequential", **teacher}
    base["eval"]["after"] = False
    from omniopd.config import build_config

    return build_config(base)


def test_each_step_logs_its_cached_and_written_tokens_and_dollars(tiny_model_dir, gsm8k_like, tmp_path, fake):
    from omniopd.training.trainer import train

    fake.cache_min_tokens = 4
    out = tmp_path / "run"
    train(_train_cfg(tiny_model_dir, gsm8k_like, out, fake, **HAIKU), progress=False)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for r in rows:
        assert r["teacher/cached_tokens"] > 0 and r["teacher/cache_write_tokens"] > 0 and r["teacher/cost_usd"] > 0
        assert r["teacher/cached_tokens"] + r["teacher/cache_write_tokens"] <= r["teacher/tokens_in"]
    # the run total is the steps' sum plus the start-of-run teacher check, which the totals include
    last = rows[-1]
    assert last["teacher/total_cost_usd"] >= sum(r["teacher/cost_usd"] for r in rows) > 0
    assert last["teacher/total_cached_tokens"] >= sum(r["teacher/cached_tokens"] for r in rows)


def test_the_cap_stops_a_run_on_cached_pricing(tiny_model_dir, gsm8k_like, tmp_path, fake):
    from omniopd.training.trainer import train

    fake.cache_min_tokens = 4
    cfg = _train_cfg(tiny_model_dir, gsm8k_like, tmp_path / "run", fake, max_cost_usd=3.0, price_input_per_mtok=0.0,
                     price_output_per_mtok=0.0, price_cache_write_per_mtok=0.0, price_cached_input_per_mtok=2e3)
    cfg = cfg.model_copy(update={"max_steps": 50})
    with pytest.raises(TeacherError, match="max_cost_usd .* read from the prompt cache"):
        train(cfg, progress=False)
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) < 50


class _RoundSpy(Teacher):
    """Notes how many HTTP requests the fake had seen when each adaptive round began."""

    def __init__(self, inner, fake):
        self.inner, self.fake, self.name, self.starts = inner, fake, inner.name, []

    def continue_prefixes(self, requests, spec):
        self.starts.append(self.fake.count())
        return self.inner.continue_prefixes(requests, spec)

    def metrics(self):
        return self.inner.metrics()


def test_a_later_adaptive_round_reads_its_whole_prompt_from_the_cache(fake):
    from omniopd.config import build_config
    from omniopd.data import Example
    from omniopd.engine.prompts import student_messages
    from omniopd.engine.rollout import chat_prompts, sample_rollouts
    from omniopd.methods.omniopd.audit import run_audit

    tok = char_tokenizer()
    model = tiny_llama(vocab_size=len(tok))
    examples = [Example(id=str(i), question=f"Tom has {i} apples and buys {i + 1} more. How many now?",
                        answer=str(2 * i + 1)) for i in (1, 2)]
    torch.manual_seed(0)
    ro = sample_rollouts(model, tok, chat_prompts(tok, [student_messages(e.question) for e in examples]),
                         samples_per_prompt=2, max_new_tokens=24, temperature=1.0, top_p=1.0, batch_size=8)
    fake.cache_min_tokens = 4
    cfg = build_config({"audit": {"chunk_tokens": 4, "num_chunks": 2, "teacher_samples": 6, "adaptive_n": True,
                                  "adaptive_round": 2, "adaptive_width": 1e-6}})
    with anthropic(fake, prompt_cache_min_tokens=4, **HAIKU) as teacher:
        spy = _RoundSpy(teacher, fake)
        result = run_audit(step=1, model=model, tokenizer=tok, batch=ro.batch, lengths=ro.lengths,
                           examples=[examples[i] for i in ro.example_index], teacher=spy, audit_cfg=cfg.audit,
                           teacher_cfg=cfg.teacher, seed=0, micro_batch_size=4, slice_size=16)
    assert len(spy.starts) == 3  # a width no posterior reaches: every chunk goes on to N in rounds of 2
    later = fake.requests[spy.starts[1]:]
    assert later and all(r.usage.cached_tokens == r.usage.prompt_tokens for r in later)  # read whole, nothing written
    assert result.metrics["teacher/cached_tokens"] == sum(r.usage.cached_tokens for r in fake.requests)
    assert result.metrics["teacher/cache_write_tokens"] == sum(r.usage.cache_write_tokens for r in fake.requests)

"""Every API teacher through its official SDK, pointed at the local fake provider server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from omniopd.errors import ConfigError, TeacherError
from omniopd.teachers.anthropic_backend import AnthropicTeacher
from omniopd.teachers.base import ContinuationRequest, SamplingSpec
from omniopd.teachers.cache import ResponseCache
from omniopd.teachers.gemini_backend import GeminiTeacher
from omniopd.teachers.openai_backend import OpenAIChatTeacher, OpenAICompletionsTeacher
from omniopd.teachers.runtime import APITeacher, BudgetLedger, parse_retry_after
from omniopd.testing.fake_providers import FakeProviderServer, Fault

SECRET = "sk-test-SECRET-do-not-store-0123456789"
FAST = {"backoff_base_s": 0.01, "backoff_max_s": 0.05, "max_retries": 3, "timeout_s": 5.0}
REQUESTS = [
    ContinuationRequest(question="What is 2 + 3?", prefix="We add 2 and 3 ", trajectory=0),
    ContinuationRequest(question="What is 2 + 3?", prefix="We add 2 and 3 to get", trajectory=0),
    ContinuationRequest(question="What is 4 * 5?", prefix="", trajectory=1),
]
SPEC = SamplingSpec(n=4, max_new_tokens=6, seed=7)

# backend name -> (factory(server, **options), route, per-call sample cap used by the backend)
Factory = Callable[..., APITeacher]
BACKENDS: dict[str, tuple[Factory, str]] = {
    "openai-completions": (
        lambda s, **kw: OpenAICompletionsTeacher("fake-model", base_url=s.url + "/v1", **kw),
        "openai.completions",
    ),
    "openai-chat": (lambda s, **kw: OpenAIChatTeacher("fake-model", base_url=s.url + "/v1", **kw), "openai.chat"),
    "anthropic": (lambda s, **kw: AnthropicTeacher("fake-claude", base_url=s.url, **kw), "anthropic.messages"),
    "gemini": (lambda s, **kw: GeminiTeacher("fake-gemini", base_url=s.url, **kw), "gemini.generate"),
}


@pytest.fixture(scope="module")
def server() -> Iterator[FakeProviderServer]:
    with FakeProviderServer() as s:
        yield s


@pytest.fixture
def fake(server: FakeProviderServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeProviderServer]:
    for name in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GEMINI_API_KEY"):
        monkeypatch.setenv(name, SECRET)
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    server.clear()
    server.max_choices = None
    server.chat_preamble = ""
    yield server
    # requests cancelled mid-test (a budget cap) may still be arriving: let them land before the next test
    deadline, last = time.monotonic() + 2.0, -1
    while time.monotonic() < deadline and server.count() != last:
        last = server.count()
        time.sleep(0.1)
    server.clear()


def make(name: str, server: FakeProviderServer, **options: Any) -> APITeacher:
    factory, _ = BACKENDS[name]
    return factory(server, **{**FAST, **options})


@pytest.mark.parametrize("name", list(BACKENDS))
def test_returns_exactly_n_texts_with_the_key_from_the_environment(name: str, fake: FakeProviderServer) -> None:
    with make(name, fake) as teacher:
        results = teacher.continue_prefixes(REQUESTS, SPEC)
        metrics = teacher.metrics()
    assert [r.error for r in results] == [None, None, None]
    assert [len(r.texts) for r in results] == [4, 4, 4]
    assert all(len(set(r.texts)) == 4 for r in results)  # N distinct draws
    assert all(r.prompt_tokens > 0 and r.completion_tokens > 0 for r in results)
    route = BACKENDS[name][1]
    assert fake.count(route) == fake.count() == metrics["teacher/requests"]
    assert metrics["teacher/retries"] == 0 and metrics["teacher/failed_requests"] == 0
    assert metrics["teacher/tokens_in"] > 0 and metrics["teacher/latency_p95_s"] >= metrics["teacher/latency_p50_s"] > 0
    headers = fake.requests[0].headers
    assert SECRET in (headers.get("authorization", "") + headers.get("x-goog-api-key", ""))


def test_requests_carry_the_protocol_payloads(fake: FakeProviderServer) -> None:
    req = [ContinuationRequest(question="What is 2 + 3?", prefix="We add ", reference="2 + 3 = 5")]
    spec = SamplingSpec(n=2, max_new_tokens=10, temperature=0.8, seed=1)
    with make("openai-completions", fake) as t:
        t.continue_prefixes(req, spec)
    body = fake.requests[-1].body
    assert body["prompt"].endswith("Answer:\nWe add ") and body["n"] == 2 and body["max_tokens"] == 10
    assert body["temperature"] == 0.8 and body["stop"] == ["\nQuestion:"] and "seed" in body
    with make("anthropic", fake, privileged=True) as t:
        out = t.continue_prefixes(req, spec)
    body = fake.requests[-1].body
    assert body["messages"][-1] == {"role": "assistant", "content": "We add"}  # trailing space stripped
    assert "2 + 3 = 5" in body["messages"][0]["content"]  # privileged reference
    assert "temperature" not in body and "n" not in body
    assert all(not t.startswith(" ") for t in out[0].texts)  # the stripped space was accounted for
    fake.chat_preamble = "Here is the continuation:\n"
    with make("gemini", fake, max_n_per_request=2) as t:
        out = t.continue_prefixes(req, spec)
    body = fake.requests[-1].body
    assert body["generationConfig"]["candidateCount"] == 2 and body["generationConfig"]["maxOutputTokens"] == 15
    assert "<partial_answer>\nWe add </partial_answer>" in body["contents"][0]["parts"][0]["text"]
    assert all("continuation" not in t for t in out[0].texts)  # preamble stripped


@pytest.mark.parametrize("name", list(BACKENDS))
def test_rate_limit_server_error_and_timeout_are_retried_and_counted(name: str, fake: FakeProviderServer) -> None:
    route = BACKENDS[name][1]
    fake.inject(
        Fault.rate_limit(retry_after=0.3, route=route),
        Fault.server_error(500, route=route),
        Fault.slow(2.5, route=route),
    )
    spec = SamplingSpec(n=1, max_new_tokens=4)
    with make(name, fake, timeout_s=1.0) as teacher:
        started = time.perf_counter()
        results = teacher.continue_prefixes(REQUESTS[:1], spec)
        elapsed = time.perf_counter() - started
        metrics = teacher.metrics()
    assert results[0].error is None and len(results[0].texts) == 1
    assert metrics["teacher/retries"] == 3 and metrics["teacher/requests"] == 4
    assert metrics["teacher/failed_requests"] == 0
    assert elapsed >= 0.3 + 1.0  # honoured Retry-After, waited out the timeout


@pytest.mark.parametrize("name", list(BACKENDS))
def test_a_request_failing_every_retry_ends_with_error(name: str, fake: FakeProviderServer) -> None:
    route = BACKENDS[name][1]
    fake.inject(*[Fault.server_error(503, route=route) for _ in range(3)])
    with make(name, fake, max_retries=2) as teacher:
        results = teacher.continue_prefixes(REQUESTS[2:], SamplingSpec(n=1, max_new_tokens=4))
        metrics = teacher.metrics()
    assert results[0].texts == [] and results[0].error is not None and "503" in results[0].error
    assert "3 attempts" in results[0].error
    assert (
        metrics["teacher/requests"] == 3 and metrics["teacher/retries"] == 2 and metrics["teacher/failed_requests"] == 1
    )


def test_a_bad_request_is_not_retried(fake: FakeProviderServer) -> None:
    fake.inject(Fault.server_error(400))
    with make("openai-chat", fake) as teacher:
        results = teacher.continue_prefixes(REQUESTS[2:], SamplingSpec(n=2, max_new_tokens=4))
        assert teacher.metrics()["teacher/requests"] == 1
    assert results[0].error is not None and "400" in results[0].error


@pytest.mark.parametrize("name", ["openai-completions", "anthropic"])
def test_auth_failure_is_fatal(name: str, fake: FakeProviderServer) -> None:
    fake.inject(Fault.server_error(401))
    with make(name, fake) as teacher, pytest.raises(TeacherError, match="401"):
        teacher.continue_prefixes(REQUESTS[2:], SamplingSpec(n=1, max_new_tokens=4))


def test_completions_are_topped_up_when_the_server_returns_one_choice(fake: FakeProviderServer) -> None:
    fake.max_choices = 1  # like `transformers serve`: one choice whatever n asks
    with make("openai-completions", fake) as teacher:
        results = teacher.continue_prefixes(REQUESTS, SPEC)
        metrics = teacher.metrics()
    assert [len(r.texts) for r in results] == [4, 4, 4] and all(r.error is None for r in results)
    assert all(len(set(r.texts)) == 4 for r in results)
    assert metrics["teacher/requests"] == 12 and metrics["teacher/topup_requests"] == 9
    first = [r.body for r in fake.requests if r.body["n"] == 4]
    topups = [r.body for r in fake.requests if r.body["n"] == 1]
    assert len(first) == 3 and len(topups) == 9
    assert len({b["seed"] for b in topups}) == 3  # each sample index has its own seed


@pytest.mark.parametrize("name", ["openai-chat", "gemini"])
def test_chat_backends_top_up_a_short_answer_or_report_it(name: str, fake: FakeProviderServer) -> None:
    route = BACKENDS[name][1]
    fake.inject(Fault.few(1, route=route))
    with make(name, fake, max_n_per_request=4) as teacher:
        results = teacher.continue_prefixes(REQUESTS[2:], SPEC)
        assert teacher.metrics()["teacher/topup_requests"] == 3
    assert len(results[0].texts) == 4 and results[0].error is None
    fake.inject(Fault.few(1, route=route))
    with make(name, fake, max_n_per_request=4, max_topup_rounds=0) as teacher:
        results = teacher.continue_prefixes(REQUESTS[2:], SPEC)
    assert results[0].texts == [] and results[0].error == "teacher returned 1 of 4 continuations after 0 top-up rounds"


@pytest.mark.parametrize("name", list(BACKENDS))
def test_cost_cap_raises_teacher_error(name: str, fake: FakeProviderServer) -> None:
    with make(name, fake, price_input_per_mtok=1_000.0, price_output_per_mtok=1_000.0, max_cost_usd=0.001) as teacher:
        with pytest.raises(TeacherError, match="max_cost_usd"):
            teacher.continue_prefixes(REQUESTS, SPEC)
        assert teacher.metrics()["teacher/cost_usd"] >= 0.001
        # requests cancelled when the cap was hit may still be reaching the server: count the teacher's sends
        sent = teacher.metrics()["teacher/requests"]
        with pytest.raises(TeacherError, match="budget reached"):  # checked before any new request
            teacher.continue_prefixes(REQUESTS[:1], SPEC)
        assert teacher.metrics()["teacher/requests"] == sent


def test_token_cap_raises_teacher_error(fake: FakeProviderServer) -> None:
    teacher = make("openai-completions", fake, max_total_tokens=10, dispatch="sequential")
    with teacher, pytest.raises(TeacherError, match="max_total_tokens 10"):
        teacher.continue_prefixes(REQUESTS, SPEC)


@pytest.mark.parametrize("name", list(BACKENDS))
def test_second_identical_call_is_served_from_the_cache(name: str, fake: FakeProviderServer, tmp_path: Path) -> None:
    cache = tmp_path / "teacher-cache.sqlite"
    with make(name, fake, cache_path=str(cache)) as first:
        expected = first.continue_prefixes(REQUESTS, SPEC)
        assert first.metrics()["teacher/cache_hits"] == 0
    sent = fake.count()
    with make(name, fake, cache_path=str(cache)) as second:  # a new teacher (a rerun), the same file
        again = second.continue_prefixes(REQUESTS, SPEC)
        metrics = second.metrics()
    assert fake.count() == sent  # zero new HTTP requests
    assert [r.texts for r in again] == [r.texts for r in expected]
    assert (
        metrics["teacher/cache_hits"] == sent and metrics["teacher/requests"] == 0 and metrics["teacher/cost_usd"] == 0
    )
    for path in tmp_path.iterdir():  # the key is never written (main file, WAL, shm)
        assert SECRET.encode() not in path.read_bytes()
    # another seed is another draw: not a cache hit
    with make(name, fake, cache_path=str(cache)) as third:
        third.continue_prefixes(REQUESTS[:1], SamplingSpec(n=4, max_new_tokens=6, seed=8))
    assert fake.count() > sent  # even for Anthropic, whose payload carries no seed


@pytest.mark.parametrize("cached", [True, False])
def test_requests_for_the_same_draw_in_flight_at_once_share_one_request_when_cached(
    cached: bool, fake: FakeProviderServer, tmp_path: Path
) -> None:
    """Three trajectories whose chunks start after the same text ask for the same draw (the cache key): with the
    cache on, sent at once they share one HTTP request and its texts, as a rerun reading the cache would; without
    it, each is its own draw. The fake's texts depend on arrival order, so separate sends differ."""
    same = [ContinuationRequest(question="What is 2 + 3?", prefix="We add", trajectory=t) for t in range(3)]
    fake.latency_s = 0.2  # every request is still in flight when the next one looks for it
    try:
        options = {"cache_path": str(tmp_path / "cache.sqlite")} if cached else {}
        with make("openai-completions", fake, dispatch="parallel", **options) as teacher:
            results = teacher.continue_prefixes(same, SPEC)
            metrics = teacher.metrics()
    finally:
        fake.latency_s = 0.0
    texts = [r.texts for r in results]
    assert all(len(t) == SPEC.n for t in texts)
    if cached:
        assert fake.count() == 1 and metrics["teacher/requests"] == 1 and metrics["teacher/cache_hits"] == 2
        assert texts[0] == texts[1] == texts[2]
    else:
        assert fake.count() == 3 and metrics["teacher/cache_hits"] == 0
        assert len({tuple(t) for t in texts}) == 3  # three draws, all different


def test_a_shared_request_that_fails_fails_every_chunk_sharing_it(fake: FakeProviderServer, tmp_path: Path) -> None:
    same = [ContinuationRequest(question="What is 2 + 3?", prefix="We add", trajectory=t) for t in range(2)]
    fake.inject(Fault.server_error(400))  # a 4xx other than 401/403/404/408/409/425/429: not retried
    with make("openai-completions", fake, dispatch="parallel", cache_path=str(tmp_path / "cache.sqlite")) as teacher:
        results = teacher.continue_prefixes(same, SPEC)
    assert fake.count() == 1
    assert all(r.error is not None and "400" in r.error for r in results)


def test_trajectories_are_dispatched_in_ascending_prefix_order(fake: FakeProviderServer) -> None:
    requests = [
        ContinuationRequest(question="Q", prefix="a b c d e", trajectory=0),
        ContinuationRequest(question="Q", prefix="a", trajectory=0),
        ContinuationRequest(question="Q", prefix="a b c", trajectory=0),
    ]
    with make("openai-completions", fake, max_concurrency=1) as teacher:
        results = teacher.continue_prefixes(requests, SamplingSpec(n=2, max_new_tokens=4))
    assert all(r.error is None for r in results)  # results stay in request order
    sent = [r.body["prompt"].rsplit("Answer:\n", 1)[1] for r in fake.requests]
    assert sent == ["a", "a b c", "a b c d e"]


def test_options_are_validated_and_a_missing_key_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(TeacherError, match="OPENAI_API_KEY"):
        OpenAICompletionsTeacher("gpt-x")  # the real endpoint needs a key
    OpenAICompletionsTeacher("local", base_url="http://127.0.0.1:9/v1").close()  # a local server gets a dummy
    with pytest.raises(ConfigError, match="max_concurrency"):
        OpenAIChatTeacher("m", base_url="http://127.0.0.1:9/v1", max_concurrency=0)
    with pytest.raises(ConfigError, match="unexpected keyword"):
        AnthropicTeacher("m", base_url="http://127.0.0.1:9", api_key="sk-in-config")  # keys are never options
    with pytest.raises(ValueError, match="greedy"):
        OpenAICompletionsTeacher("m", base_url="http://127.0.0.1:9/v1").continue_prefixes(
            REQUESTS, SamplingSpec(n=2, max_new_tokens=4, temperature=0.0)
        )


def test_ledger_snapshot_and_retry_after_parsing() -> None:
    ledger = BudgetLedger(price_input_per_mtok=2.0, price_output_per_mtok=10.0)
    for latency in (0.1, 0.2, 0.3, 0.4, 1.0):
        ledger.record_request()
        ledger.record_success(1_000, 100, latency)
    snap = ledger.snapshot()
    assert snap["teacher/requests"] == 5 and snap["teacher/tokens_in"] == 5_000 and snap["teacher/tokens_out"] == 500
    assert snap["teacher/cost_usd"] == pytest.approx((5_000 * 2.0 + 500 * 10.0) / 1e6)
    assert snap["teacher/latency_p50_s"] == pytest.approx(0.3) and snap["teacher/latency_p95_s"] == pytest.approx(0.88)
    assert set(snap) >= {
        "teacher/requests",
        "teacher/retries",
        "teacher/failed_requests",
        "teacher/tokens_in",
        "teacher/tokens_out",
        "teacher/latency_p50_s",
        "teacher/latency_p95_s",
        "teacher/cost_usd",
        "teacher/cache_hits",
    }
    assert parse_retry_after({"retry-after": "2"}) == 2.0
    assert parse_retry_after({"retry-after-ms": "250"}) == 0.25
    assert parse_retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0  # a date in the past
    assert parse_retry_after({}) is None


def test_cache_survives_a_process_killed_mid_write(tmp_path: Path) -> None:
    path = tmp_path / "killed.sqlite"
    writer = (
        "import sys\n"
        "from omniopd.teachers.cache import CachedResponse, ResponseCache, cache_key\n"
        f"cache = ResponseCache({str(path)!r})\n"
        "i = 0\n"
        "while True:\n"
        "    cache.put(cache_key('b', 'm', {'i': i}, {}), 'b', 'm', CachedResponse(['x' * 4000] * 8, i, i))\n"
        "    i += 1\n"
        "    if i == 50:\n"
        "        print('ready', flush=True)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE, env=env)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        time.sleep(0.2)  # let it write on, then kill it wherever it is
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    cache = ResponseCache(path)
    try:
        assert cache._conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert len(cache) >= 50
        rows = cache._conn.execute("SELECT texts, prompt_tokens FROM responses").fetchall()
        assert all(len(json.loads(texts)) == 8 for texts, _ in rows)  # no torn row
    finally:
        cache.close()

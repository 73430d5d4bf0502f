"""Requests in flight that follow the server: the limiter's rules by hand, and training steps against a fake
server that works on one request at a time (as ``transformers serve`` does)."""

from __future__ import annotations

import asyncio
import json

import pytest

from conftest import tiny_run_config, tiny_run_files
from omniopd.config import build_config
from omniopd.errors import ConfigError
from omniopd.teachers.concurrency import ConcurrencyLimit

pytest.importorskip("openai")

from omniopd.testing.fake_providers import FakeProviderServer  # noqa: E402
from omniopd.training.trainer import train  # noqa: E402

NO_KEY_ENV = "OMNIOPD_TEST_UNSET_KEY"


def run(coro):
    return asyncio.run(coro)


def test_slow_start_then_additive_increase_then_one_halving_per_round_trip() -> None:
    async def scenario() -> None:
        lim = ConcurrencyLimit(8, timeout_s=10.0)  # halves on an answer slower than 5 s
        assert lim.allowed == 1  # starts at min_concurrency
        s = await lim.acquire()
        s.latency_s = 1.0
        lim.release(s)  # every slot was taken, no queueing: slow start adds one
        assert lim.allowed == 2
        a, b = await lim.acquire(), await lim.acquire()
        assert not a.full and b.full
        a.latency_s = 1.0
        lim.release(a)  # went out with a slot to spare: no evidence that more would work
        assert lim.limit == 2.0
        b.latency_s = 1.4
        lim.release(b)  # 1.4 <= 1.5 x the fastest (1.0): still no queueing, slow start
        assert lim.allowed == 3
        s0, s1, s2 = [await lim.acquire() for _ in range(3)]
        s2.latency_s = 2.0
        lim.release(s2)  # 2.0 > 1.5 x 1.0: queueing has begun; additive from here (+1/limit)
        assert lim.limit == pytest.approx(3 + 1 / 3) and not lim.slow_start
        s1.latency_s = 6.0
        lim.release(s1)  # more than half the timeout: halve
        assert lim.limit == pytest.approx((3 + 1 / 3) / 2) and lim.allowed == 1 and lim.reductions == 1
        s0.overloaded = True
        lim.release(s0)  # sent before that halving, which already answered this overload
        assert lim.reductions == 1 and lim.limit == pytest.approx(5 / 3)
        late = await lim.acquire()
        late.overloaded = True  # a timeout sent after it: halves again, but not below the floor
        lim.release(late)
        assert lim.limit == 1.0 and lim.allowed == 1 and lim.reductions == 1  # 5/3 -> 1 allowed either way
        assert lim.metrics() == {"teacher/concurrency": 1.0, "teacher/concurrency_reductions": 1.0}
        assert lim.in_flight == 0

    run(scenario())


def test_without_adaptation_the_limit_is_the_ceiling_whatever_happens() -> None:
    async def scenario() -> None:
        lim = ConcurrencyLimit(4, adaptive=False, timeout_s=1.0)
        slots = [await lim.acquire() for _ in range(4)]
        assert lim.allowed == 4 and lim.in_flight == 4
        for s in slots:
            s.overloaded = True
            lim.release(s)
        assert lim.allowed == 4 and lim.reductions == 0

    run(scenario())


def test_waiters_get_slots_in_order_and_a_cancelled_waiter_leaks_none() -> None:
    async def scenario() -> None:
        lim = ConcurrencyLimit(1)
        held = await lim.acquire()
        order: list[int] = []

        async def waiter(i: int) -> None:
            async with lim.hold():
                order.append(i)
                await asyncio.sleep(0)

        tasks = [asyncio.create_task(waiter(i)) for i in range(4)]
        await asyncio.sleep(0)
        tasks[1].cancel()
        lim.release(held)
        await asyncio.gather(*tasks, return_exceptions=True)
        assert order == [0, 2, 3]
        assert lim.in_flight == 0 and lim.allowed == 1

    run(scenario())


def test_min_concurrency_is_a_floor_checked_against_the_ceiling(tmp_path) -> None:
    cfg = tiny_run_config(tmp_path / "tiny", tmp_path / "train.jsonl", tmp_path / "run")
    cfg["teacher"] = {"type": "openai-completions", "model": "m", "base_url": "http://127.0.0.1:9/v1",
                      "max_concurrency": 4, "min_concurrency": 6}
    with pytest.raises(ConfigError, match=r"teacher.min_concurrency: must be <= teacher.max_concurrency \(4\)"):
        build_config(cfg)
    assert ConcurrencyLimit(8, floor=3).allowed == 3


def _serial_run(tmp_path, name: str, fake: FakeProviderServer, timeout_s: float = 0.5, **teacher) -> list[dict]:
    """One training step (4 trajectories, M=3 chunks, N=4) whose teacher is ``fake``."""
    model_dir, data = tiny_run_files(tmp_path)
    out = tmp_path / name
    cfg = tiny_run_config(
        model_dir, data, out, max_steps=1,
        audit={"chunk_tokens": 4, "num_chunks": 3, "teacher_samples": 4, "max_failed_chunk_frac": 1.0},
    )
    # one retry, 0.1-0.2 s later: the default five (1 + 2 + 4 + 8 + 16 s of backoff) outlast any storm of
    # this size, which would leave the fixed limit's cost in time, not in chunks
    cfg["teacher"] = {"type": "openai-completions", "model": "fake-teacher", "base_url": fake.url + "/v1",
                      "api_key_env": NO_KEY_ENV, "cache": False, "timeout_s": timeout_s,
                      "max_retries": 1, "backoff_base_s": 0.2, **teacher}
    train(build_config(cfg), progress=False)
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _one_at_a_time() -> FakeProviderServer:
    # 0.3 s per request, one at a time, one choice per request (each chunk: 1 request, then 3 top-ups); with a
    # 0.5 s timeout a request that waits behind another times out
    return FakeProviderServer(latency_s=0.3, max_in_flight=1, max_choices=1)


def test_a_step_on_a_one_at_a_time_server_loses_no_chunks_with_adaptive_concurrency(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv(NO_KEY_ENV, raising=False)
    with _one_at_a_time() as fake:
        # a 1 s timeout: four requests at once would already time out; the margin keeps a loaded machine's
        # scheduling delays from counting as the server's
        [row] = _serial_run(tmp_path, "adaptive", fake, timeout_s=1.0)
        assert fake.count() == row["teacher/total_requests"]
    assert row["audit/chunks"] >= 8 and row["teacher/failed_chunks"] == 0
    # not one request waited long enough to time out, so the retry budget played no part
    assert row["teacher/total_retries"] == 0 and row["teacher/total_failed_requests"] == 0
    assert row["teacher/concurrency"] <= 2.0


@pytest.mark.slow
def test_without_adaptive_concurrency_the_same_step_loses_chunks(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv(NO_KEY_ENV, raising=False)
    with _one_at_a_time() as fake:
        [row] = _serial_run(tmp_path, "fixed", fake, timeout_s=1.0, adaptive_concurrency=False)
    assert row["teacher/concurrency"] == 16.0 and row["teacher/total_retries"] > 0
    # the first wave (12 requests at once) times out behind the server's queue but for about 3; their retries queue
    # behind the abandoned requests the server still works through (FIFO, 0.3 s each), so they time out too
    assert row["teacher/failed_chunks"] > 0

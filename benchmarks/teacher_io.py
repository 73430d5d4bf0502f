"""Teacher I/O benchmark: how fast the API runtime drives a server with a fixed latency.

Starts the fake OpenAI-compatible server (``omniopd.testing.fake_providers``) with a fixed artificial
latency per request, in a child process so the server does not compete for this process's GIL. Then
sends ``--requests`` one-sample completions through ``OpenAICompletionsTeacher`` (official ``openai``
SDK and the shared runtime: semaphore, retries, ledger) with 1, 8 and 32 requests in flight
(``max_concurrency``), each request its own trajectory. Reports requests/second, the ledger's p50/p95
request latency, the ideal rate ``in_flight / latency``, and the rate of the bare SDK under a plain
semaphore (no runtime), so the runtime's own overhead is visible. Loopback only; bounded in count.

    PYTHONPATH=src python benchmarks/teacher_io.py --output teacher_io.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import platform
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

from omniopd.teachers.base import ContinuationRequest, SamplingSpec
from omniopd.teachers.openai_backend import OpenAICompletionsTeacher
from omniopd.teachers.runtime import BudgetLedger
from omniopd.testing.fake_providers import FakeProviderServer


class ServerProcess:
    """The fake server in a child process, so its request handling does not share this process's GIL
    with the client being measured. ``count()`` asks the child how many requests it has served."""

    def __init__(self, latency_s: float) -> None:
        self.latency_s = latency_s
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, latency_s), daemon=True)

    def __enter__(self) -> ServerProcess:
        self._proc.start()
        self.url = self._conn.recv()
        return self

    def count(self) -> int:
        self._conn.send("count")
        return int(self._conn.recv())

    def __exit__(self, *exc: object) -> None:
        self._conn.send("stop")
        self._proc.join(timeout=10)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(timeout=10)


def _serve(conn: Any, latency_s: float) -> None:
    with FakeProviderServer(latency_s=latency_s) as server:
        conn.send(server.url)
        while (msg := conn.recv()) != "stop":
            conn.send(server.count() if msg == "count" else None)


async def _raw_sdk(url: str, in_flight: int, n_requests: int) -> float:
    """Requests/second of the bare SDK under a semaphore: the ceiling the runtime is compared with."""
    import openai

    client = openai.AsyncOpenAI(api_key="sk-bench", base_url=url + "/v1", max_retries=0)
    sem = asyncio.Semaphore(in_flight)

    async def one(i: int) -> None:
        async with sem:
            await client.completions.create(model="bench-model", prompt=f"raw {i}", max_tokens=16, n=1)

    await asyncio.gather(*[one(i) for i in range(in_flight)])  # warm-up
    started = time.perf_counter()
    await asyncio.gather(*[one(i) for i in range(n_requests)])
    wall = time.perf_counter() - started
    await client.close()
    return n_requests / wall


def run_level(server: ServerProcess, in_flight: int, n_requests: int) -> dict[str, float]:
    requests = [
        ContinuationRequest(question=f"Question {i}?", prefix=f"Partial answer {i} ", trajectory=i)
        for i in range(n_requests)
    ]
    spec = SamplingSpec(n=1, max_new_tokens=16, seed=1000 + in_flight)
    teacher = OpenAICompletionsTeacher(
        "bench-model",
        base_url=server.url + "/v1",
        api_key_env="OMNIOPD_BENCH_UNSET_KEY",
        max_concurrency=in_flight,
        adaptive_concurrency=False,  # exactly in_flight requests at once, as the bare-SDK baseline
        timeout_s=30.0,
        max_retries=0,
    )
    with teacher:
        teacher.continue_prefixes(requests[: min(in_flight, n_requests)], spec)  # warm-up: client, connections
        before = server.count()
        teacher.ledger = BudgetLedger()  # fresh counters (and latencies) for the measured run
        started = time.perf_counter()
        results = teacher.continue_prefixes(requests, spec)
        wall = time.perf_counter() - started
        metrics = teacher.metrics()
    failed = sum(1 for r in results if r.error is not None)
    sent = server.count() - before
    return {
        "in_flight": in_flight,
        "requests": sent,
        "failed": failed,
        "wall_s": round(wall, 4),
        "requests_per_s": round(sent / wall, 2),
        "ideal_requests_per_s": round(in_flight / server.latency_s, 2) if server.latency_s else float("inf"),
        "latency_p50_s": round(metrics["teacher/latency_p50_s"], 4),
        "latency_p95_s": round(metrics["teacher/latency_p95_s"], 4),
        "bare_sdk_requests_per_s": round(asyncio.run(_raw_sdk(server.url, in_flight, n_requests)), 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--latency-ms", type=float, default=50.0, help="fixed server latency per request [50]")
    parser.add_argument("--requests", type=int, default=128, help="requests per concurrency level [128]")
    parser.add_argument("--in-flight", type=str, default="1,8,32", help="comma-separated levels [1,8,32]")
    args = parser.parse_args(argv)
    levels = [int(x) for x in args.in_flight.split(",") if x.strip()]
    if args.requests < 1 or not levels or min(levels) < 1 or args.latency_ms < 0:
        parser.error("need --requests >= 1, levels >= 1 and --latency-ms >= 0")
    rows = []
    with ServerProcess(latency_s=args.latency_ms / 1000.0) as server:
        for level in levels:
            row = run_level(server, level, args.requests)
            rows.append(row)
            print(
                f"in_flight={level:>3}  {row['requests_per_s']:>8.1f} req/s (ideal {row['ideal_requests_per_s']:.1f})  "
                f"p50={row['latency_p50_s'] * 1000:.1f} ms  p95={row['latency_p95_s'] * 1000:.1f} ms  "
                f"(bare SDK {row['bare_sdk_requests_per_s']:.1f} req/s)",
                file=sys.stderr,
            )
    report = {
        "benchmark": "teacher_io",
        "server": "omniopd.testing.fake_providers (threaded http.server on 127.0.0.1, in a child process)",
        "server_latency_s": args.latency_ms / 1000.0,
        "requests_per_level": args.requests,
        "results": rows,
        "python": platform.python_version(),
        "openai_sdk": version("openai"),
        "machine": platform.machine(),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The budget ledger of an API teacher: tokens, requests, retries and dollars, per step and in total,
and the caps (``teacher.max_cost_usd``, ``teacher.max_tokens``) that stop a run cleanly."""

from __future__ import annotations

import threading
from collections import deque

from omniopd.errors import TeacherError
from omniopd.stats import percentile


class BudgetLedger:
    """Counts what the teacher spent; raises :class:`TeacherError` when a cap is reached.

    Latency percentiles are over the last ``latency_window`` successful requests. Thread-safe.
    """

    def __init__(
        self,
        price_input_per_mtok: float = 0.0,
        price_output_per_mtok: float = 0.0,
        max_cost_usd: float | None = None,
        max_total_tokens: int | None = None,
        latency_window: int = 10_000,
    ) -> None:
        self.price_input_per_mtok = price_input_per_mtok
        self.price_output_per_mtok = price_output_per_mtok
        self.max_cost_usd = max_cost_usd
        self.max_total_tokens = max_total_tokens
        self.requests = 0
        self.retries = 0
        self.failed_requests = 0
        self.tokens_in = 0
        self.tokens_out = 0
        self.cache_hits = 0
        self.topup_requests = 0
        self.identical_chunks = 0
        self._latencies: deque[float] = deque(maxlen=latency_window)
        self._lock = threading.Lock()

    @property
    def cost_usd(self) -> float:
        return (self.tokens_in * self.price_input_per_mtok + self.tokens_out * self.price_output_per_mtok) / 1e6

    def check(self) -> None:
        """Called before each new request."""
        with self._lock:
            cost, total = self.cost_usd, self.tokens_in + self.tokens_out
        if self.max_cost_usd is not None and cost >= self.max_cost_usd:
            raise TeacherError(
                f"teacher budget reached: estimated cost ${cost:.4f} >= max_cost_usd ${self.max_cost_usd:.4f} "
                f"after {self.requests} requests ({self.tokens_in} tokens in, {self.tokens_out} out); "
                "raise the cap or resume with the response cache"
            )
        if self.max_total_tokens is not None and total >= self.max_total_tokens:
            raise TeacherError(
                f"teacher budget reached: {total} tokens >= max_total_tokens {self.max_total_tokens} "
                f"after {self.requests} requests; raise the cap or resume with the response cache"
            )

    def record_request(self) -> None:
        with self._lock:
            self.requests += 1

    def record_success(self, tokens_in: int, tokens_out: int, latency_s: float) -> None:
        with self._lock:
            self.tokens_in += tokens_in
            self.tokens_out += tokens_out
            self._latencies.append(latency_s)

    def record_retry(self) -> None:
        with self._lock:
            self.retries += 1

    def record_failure(self) -> None:
        with self._lock:
            self.failed_requests += 1

    def record_cache_hit(self) -> None:
        with self._lock:
            self.cache_hits += 1

    def record_topup(self, count: int = 1) -> None:
        with self._lock:
            self.topup_requests += count

    def record_identical(self) -> None:
        with self._lock:
            self.identical_chunks += 1

    def snapshot(self) -> dict[str, float]:
        """Cumulative metrics, namespaced for the run log."""
        with self._lock:
            lat = sorted(self._latencies)
            return {
                "teacher/requests": float(self.requests),
                "teacher/retries": float(self.retries),
                "teacher/failed_requests": float(self.failed_requests),
                "teacher/tokens_in": float(self.tokens_in),
                "teacher/tokens_out": float(self.tokens_out),
                "teacher/latency_p50_s": percentile(lat, 0.50),
                "teacher/latency_p95_s": percentile(lat, 0.95),
                "teacher/cost_usd": self.cost_usd,
                "teacher/cache_hits": float(self.cache_hits),
                "teacher/topup_requests": float(self.topup_requests),
                "teacher/identical_chunks": float(self.identical_chunks),
            }

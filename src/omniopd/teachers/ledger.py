"""The budget ledger of an API teacher: tokens, requests, retries and dollars, per step and in total,
and the caps (``teacher.max_cost_usd``, ``teacher.max_total_tokens``) that stop a run cleanly.

Prompt tokens are counted in total (``teacher/tokens_in``) and, from each response's usage fields, the part
read from the provider's prompt cache (``teacher/cached_tokens``: Anthropic ``cache_read_input_tokens``, OpenAI
``prompt_tokens_details.cached_tokens``, Gemini ``cached_content_token_count``) and the part written to it
(``teacher/cache_write_tokens``: Anthropic ``cache_creation_input_tokens``, OpenAI ``cache_write_tokens``).
Each prompt token is billed at exactly one rate: cached, written, or the full input price
(:class:`~omniopd.teachers.prices.Prices`); the cost cap sees that cost.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import TYPE_CHECKING

from omniopd.errors import ConfigError, TeacherError
from omniopd.evaluation.stats import percentile
from omniopd.teachers.prices import PROVIDER_OF_BACKEND, Prices, resolve_prices

if TYPE_CHECKING:
    from omniopd.config.teachers import RuntimeOptions


class BudgetLedger:
    """Counts what the teacher spent; raises :class:`TeacherError` when a cap is reached.

    Latency percentiles are over the last ``latency_window`` successful requests. Thread-safe. A cached-read or
    cache-write price left at None is the input price (no discount assumed).
    """

    def __init__(
        self,
        price_input_per_mtok: float = 0.0,
        price_output_per_mtok: float = 0.0,
        max_cost_usd: float | None = None,
        max_total_tokens: int | None = None,
        latency_window: int = 10_000,
        price_cached_input_per_mtok: float | None = None,
        price_cache_write_per_mtok: float | None = None,
    ) -> None:
        self.prices = Prices(
            input=price_input_per_mtok,
            output=price_output_per_mtok,
            cached_input=price_input_per_mtok if price_cached_input_per_mtok is None else price_cached_input_per_mtok,
            cache_write=price_input_per_mtok if price_cache_write_per_mtok is None else price_cache_write_per_mtok,
        )
        self.max_cost_usd = max_cost_usd
        self.max_total_tokens = max_total_tokens
        self.requests = 0
        self.retries = 0
        self.failed_requests = 0
        self.tokens_in = 0
        self.tokens_out = 0
        self.cached_tokens = 0
        self.cache_write_tokens = 0
        self.cache_hits = 0
        self.topup_requests = 0
        self.identical_chunks = 0
        self._latencies: deque[float] = deque(maxlen=latency_window)
        self._lock = threading.Lock()

    @classmethod
    def for_teacher(cls, model: str, backend: str, options: RuntimeOptions) -> BudgetLedger:
        """The ledger of a ``backend`` teacher serving ``model``: prices from ``options``, the rest from the price
        table (``teachers.prices``). A cost cap with nothing priced is a :class:`ConfigError` (it could never
        trigger)."""
        prices = resolve_prices(
            model,
            PROVIDER_OF_BACKEND.get(backend, "openai"),
            input=options.price_input_per_mtok,
            output=options.price_output_per_mtok,
            cached_input=options.price_cached_input_per_mtok,
            cache_write=options.price_cache_write_per_mtok,
        )
        if options.max_cost_usd is not None and not prices.known:
            raise ConfigError(
                f"teacher.max_cost_usd needs prices: {model!r} is not in the price table (omniopd/teachers/prices.py); "
                "set teacher.price_input_per_mtok and teacher.price_output_per_mtok"
            )
        return cls(
            prices.input,
            prices.output,
            options.max_cost_usd,
            options.max_total_tokens,
            price_cached_input_per_mtok=prices.cached_input,
            price_cache_write_per_mtok=prices.cache_write,
        )

    @property
    def cost_usd(self) -> float:
        return self.prices.cost_usd(self.tokens_in, self.tokens_out, self.cached_tokens, self.cache_write_tokens)

    def check(self) -> None:
        """Called before each new request."""
        with self._lock:
            cost, total = self.cost_usd, self.tokens_in + self.tokens_out
            cached, written = self.cached_tokens, self.cache_write_tokens
        if self.max_cost_usd is not None and cost >= self.max_cost_usd:
            cache = (
                f", {cached} of them read from the prompt cache and {written} written to it"
                if cached or written
                else ""
            )
            raise TeacherError(
                f"teacher budget reached: estimated cost ${cost:.4f} >= max_cost_usd ${self.max_cost_usd:.4f} "
                f"after {self.requests} requests ({self.tokens_in} tokens in{cache}, {self.tokens_out} out); "
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

    def record_success(
        self, tokens_in: int, tokens_out: int, latency_s: float, cached_tokens: int = 0, cache_write_tokens: int = 0
    ) -> None:
        """``tokens_in`` is the whole prompt, ``cached_tokens`` and ``cache_write_tokens`` parts of it."""
        with self._lock:
            self.tokens_in += tokens_in
            self.tokens_out += tokens_out
            self.cached_tokens += cached_tokens
            self.cache_write_tokens += cache_write_tokens
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
                "teacher/cached_tokens": float(self.cached_tokens),
                "teacher/cache_write_tokens": float(self.cache_write_tokens),
                "teacher/latency_p50_s": percentile(lat, 0.50),
                "teacher/latency_p95_s": percentile(lat, 0.95),
                "teacher/cost_usd": self.cost_usd,
                "teacher/cache_hits": float(self.cache_hits),
                "teacher/topup_requests": float(self.topup_requests),
                "teacher/identical_chunks": float(self.identical_chunks),
            }

"""What every API teacher shares: concurrency, ordering, retries, the response cache and the budget ledger.

Not in the paper, which reports teacher effort but not how it was spent. Departures and choices:

* **Concurrency that follows the server.** One asyncio event loop per teacher, in a background thread, so
  the synchronous ``Teacher.continue_prefixes`` can be called from the trainer (or from inside another
  event loop). A limit bounds the HTTP requests in flight across all trajectories: by default it adapts
  (``adaptive_concurrency``; AIMD with a slow start, see ``teachers.concurrency``), shrinking on timeouts,
  429/503s and answers that take more than half the timeout, growing back while the server keeps up, between
  ``min_concurrency`` and ``max_concurrency``; a server that answers one request at a time then gets few at
  once, and no request waits in its queue until it times out. Logged as ``teacher/concurrency`` (the limit
  now) and ``teacher/total_concurrency_reductions``.
* **Prefix order.** The chunks of one trajectory have nested prefixes. They are dispatched in ascending
  prefix length, and by default (``dispatch="warm_first"``) the shortest one is sent alone first, so a
  server with prefix caching (vLLM, SGLang) computes the shared prompt once and every later request of
  that trajectory reuses it. ``"sequential"`` sends a trajectory's requests one after another (the most
  reuse, the least parallelism); ``"parallel"`` sends all at once (ascending, interleaved across
  trajectories). Within one chunk, when N samples need several requests, the first goes alone too.
* **Retries.** The SDKs' own retries are switched off (``max_retries=0``) so every retry is counted
  here. 408/409/425/429/5xx/529, timeouts and dropped connections are retried with exponential backoff and
  jitter, honouring ``Retry-After``/``retry-after-ms`` (capped at ``max_retry_after_s``) and Gemini's
  ``retryDelay``. 401/403/404 raise :class:`~omniopd.errors.TeacherError` at once (a wrong key, model or
  URL fails every request alike). A refused connection (nothing listening), any other 4xx, or a retryable
  error after the last retry, ends that request with ``error`` set: the caller drops the chunk and counts
  ``teacher/failed_chunks``. While nothing has been answered, a teacher whose every failure was of the kind
  every request meets (unreachable, rejected as malformed) says so in one line (:meth:`APITeacher.unusable_reason`;
  the start-of-run check stops the run with it).
* **Never score fewer than N.** A server that returns fewer choices than ``n`` asked (``transformers
  serve`` always returns one) is topped up with further requests, one sample each, each with its own
  sample index and seed; counted as ``teacher/topup_requests``. Still short after
  ``max_topup_rounds`` rounds, the result carries ``error``. A chunk whose N samples are all identical
  (a server that is not really sampling) is counted (``teacher/identical_chunks``) and warned about once.
* **Budget.** A ledger counts requests, retries, failures, tokens (the prompt tokens read from and written
  to the provider's prompt cache among them), latency and estimated cost (``teachers.ledger``; prices from
  the options or the table of known models, ``teachers.prices``). ``max_cost_usd`` and
  ``max_total_tokens`` are checked before every new request and raise ``TeacherError`` once reached;
  requests already in flight still complete, so the overshoot is at most ``max_concurrency`` requests.
* **Cache.** With ``cache_path`` every successful response is stored (see ``teachers.cache``); a hit
  sends nothing, costs nothing and is counted as ``teacher/cache_hits``. The cache key names one draw (the
  payload, the seed and the sample index), so with the cache on, requests with the same key in flight at
  once share one HTTP request and its answer (counted as cache hits too): two trajectories whose chunks start
  after the same text get the same N continuations whatever order their requests run in, as a rerun or a
  resumed run reading the cache does, and the teacher is paid once.
* **Credentials** are read from an environment variable whose *name* is an option; the key itself is
  never an option, so it cannot end up in a config, the cache or a log line.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import os
import random
import threading
import time
from abc import abstractmethod
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar
from urllib.parse import urlparse

from pydantic import ValidationError

from omniopd.config.teachers import RuntimeOptions, option_error
from omniopd.errors import ConfigError, TeacherError
from omniopd.evaluation.stats import mix_seed
from omniopd.teachers.base import ContinuationRequest, ContinuationResult, SamplingSpec, Teacher
from omniopd.teachers.cache import CachedResponse, ResponseCache, cache_key
from omniopd.teachers.concurrency import ConcurrencyLimit
from omniopd.teachers.ledger import BudgetLedger
from omniopd.teachers.retry import Failure, classify_exception, parse_retry_after

log = logging.getLogger(__name__)

T = TypeVar("T")

LOCAL_DUMMY_KEY = "sk-no-key-required"


# --------------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------------


# ``RuntimeOptions`` (omniopd.config.teachers, re-exported here) lists the options every API backend shares,
# with their only defaults and range checks; any backend takes them as keyword arguments. The teacher config
# of every API type extends that class, so a config passes them on field for field.


# --------------------------------------------------------------------------------------------------
# Credentials
# --------------------------------------------------------------------------------------------------


def resolve_api_key(env_names: Sequence[str], base_url: str | None, provider: str) -> str:
    """The key from the first set environment variable in ``env_names``.

    A custom ``base_url`` (a local or self-hosted server) without a key gets a dummy one; the provider's
    own endpoint without a key is a clear error.
    """
    for name in env_names:
        value = os.environ.get(name)
        if value:
            return value
    if base_url:
        host = urlparse(base_url).hostname or base_url
        log.info("no %s set; using a dummy API key for %s", " or ".join(env_names), host)
        return LOCAL_DUMMY_KEY
    raise TeacherError(f"{provider} teacher needs an API key: set the environment variable {' or '.join(env_names)}")


# --------------------------------------------------------------------------------------------------
# Event loop thread
# --------------------------------------------------------------------------------------------------


class LoopThread:
    """A private asyncio loop in a daemon thread; ``run`` blocks the caller until a coroutine finishes."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self._thread:
            raise RuntimeError("LoopThread.run called from its own loop (would deadlock)")
        fut: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result()
        except BaseException:
            fut.cancel()
            raise

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self.loop.close()


# --------------------------------------------------------------------------------------------------
# The shared API teacher
# --------------------------------------------------------------------------------------------------


@dataclass
class RawResponse:
    """What one HTTP request returned: texts (raw, before post-processing) and reported usage."""

    texts: list[str]
    prompt_tokens: int = 0  # the whole prompt, cached and written parts included
    completion_tokens: int = 0
    cached_tokens: int = 0  # read from the provider's prompt cache (teachers.prompt_cache)
    cache_write_tokens: int = 0  # written to it


@dataclass
class _CallOutcome:
    texts: list[str] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


def _first_teacher_error(exc: BaseException) -> BaseException:
    """The most useful exception inside a (nested) ExceptionGroup: a TeacherError if any."""
    if isinstance(exc, BaseExceptionGroup):
        leaves = [_first_teacher_error(e) for e in exc.exceptions]
        for leaf in leaves:
            if isinstance(leaf, TeacherError):
                return leaf
        return leaves[0] if leaves else exc
    return exc


def derive_seed(seed: int, sample_index: int) -> int:
    """Per-request seed: distinct for each sample index, so top-ups and separate requests differ."""
    return mix_seed(seed, sample_index, bounded=True)


def estimate_tokens(text: str) -> int:
    """Fallback when a server reports no usage: ~4 characters per token."""
    return math.ceil(len(text) / 4)


class APITeacher(Teacher):
    """Base of the HTTP backends. Subclasses build the payload, send it and post-process texts.

    A subclass sets ``backend`` and ``protocol`` and implements :meth:`build_payload`,
    :meth:`_create_client`, :meth:`_send` and :meth:`postprocess`; ``transient_exceptions`` lists its
    SDK's connection/timeout errors. Construct with plain keyword arguments (``from_options(**kw)``).
    """

    backend: ClassVar[str] = "api"
    protocol: ClassVar[str] = "completion"

    def __init__(
        self,
        *,
        model: str,
        base_url: str | None = None,
        privileged: bool = False,
        max_n_per_request: int | None = None,
        ledger: BudgetLedger | None = None,
        **runtime: Any,
    ) -> None:
        if not model:
            raise ConfigError(f"{self.backend} teacher needs a model name")
        if max_n_per_request is not None and max_n_per_request < 1:
            raise ConfigError(f"max_n_per_request must be >= 1, got {max_n_per_request}")
        try:
            self.options = RuntimeOptions(**runtime)
        except ValidationError as err:
            raise ConfigError(f"{self.backend} teacher: {option_error(err)}") from None
        self.model = model
        self.base_url = base_url
        self.privileged = privileged
        self.max_n_per_request = max_n_per_request
        self.name = f"{self.backend}:{model}" + (":privileged" if privileged else "")
        self.ledger = ledger or BudgetLedger.for_teacher(model, self.backend, self.options)  # prices: teachers.prices
        self.cache = ResponseCache(self.options.cache_path) if self.options.cache_path else None
        self._in_flight: dict[str, asyncio.Future[_CallOutcome]] = {}  # cache key -> the request sending it
        self._loop: LoopThread | None = None
        self._client: Any = None
        self._limit = ConcurrencyLimit(
            self.options.max_concurrency,
            floor=self.options.min_concurrency,
            adaptive=self.options.adaptive_concurrency,
            timeout_s=self.options.timeout_s,
        )
        self._permanent_failure: Failure | None = None  # the first failure every request would meet, if any
        self._other_failures = 0  # requests that failed another way
        self._rng = random.Random()
        self._warned_short = False
        self._warned_identical = False
        self.transient_exceptions: tuple[type[BaseException], ...] = ()  # the SDK's connection/timeout errors
        self.api_key_envs: tuple[str, ...] = ()

    @classmethod
    def from_options(cls, **options: Any) -> APITeacher:
        return cls(**options)

    # -- hooks ------------------------------------------------------------------------------------
    @abstractmethod
    def build_payload(
        self, request: ContinuationRequest, spec: SamplingSpec, n: int, sample_index: int
    ) -> dict[str, Any]:
        """Exactly the JSON body sent for ``n`` samples starting at ``sample_index`` (no credentials)."""

    @abstractmethod
    def _create_client(self) -> Any:
        """The SDK's async client (called inside the teacher's event loop, SDK retries off)."""

    @abstractmethod
    async def _send(self, client: Any, payload: dict[str, Any]) -> RawResponse:
        """Send one payload with the SDK; raise the SDK's exceptions unchanged."""

    @abstractmethod
    def postprocess(self, request: ContinuationRequest, text: str) -> str:
        """Raw API text -> continuation that reads right after ``request.prefix``."""

    async def _close_client(self, client: Any) -> None:
        close = getattr(client, "close", None)
        if close is not None:
            result = close()
            if asyncio.iscoroutine(result):
                await result

    def sdk_timeout_s(self) -> float:
        """The SDK's own timeout: a little above ours, so ours (counted, retried) fires first."""
        return self.options.timeout_s + 5.0

    # -- Teacher API -------------------------------------------------------------------------------
    def continue_prefixes(self, requests: list[ContinuationRequest], spec: SamplingSpec) -> list[ContinuationResult]:
        if spec.n < 1 or spec.max_new_tokens < 1:
            raise ValueError(
                f"need n >= 1 and max_new_tokens >= 1, got n={spec.n}, max_new_tokens={spec.max_new_tokens}"
            )
        if spec.temperature == 0 and spec.n > 1:
            raise ValueError("a greedy teacher (temperature 0) with n > 1 returns n identical continuations")
        if not requests:
            return []
        if self._loop is None:
            self._loop = LoopThread(name=f"omniopd-teacher-{self.backend}")
        self.plan_requests(requests)
        return self._loop.run(self._run(list(requests), spec))

    def plan_requests(self, requests: Sequence[ContinuationRequest]) -> None:  # noqa: B027 - optional hook
        """Called with each batch before any of its payloads is built: request shaping that needs the whole
        batch (the Anthropic backend's prompt-cache blocks, ``teachers.prompt_cache``)."""

    def response_cache_payload(self, payload: dict[str, Any]) -> dict[str, Any]:
        """What the response cache keys a request on: the payload less any shaping that depends on the run's
        history rather than on the request (the Anthropic backend's cache blocks), so a rerun or a resumed
        run finds the same entries."""
        return payload

    def metrics(self) -> dict[str, float]:
        return {**self.ledger.snapshot(), **self._limit.metrics()}

    def where(self) -> str:
        """The teacher's name and URL, for one-line errors."""
        return self.name + (f" at {self.base_url}" if self.base_url else "")

    def unusable_reason(self) -> str | None:
        """One line saying why this teacher cannot be used, while it has answered nothing and every request that
        failed, failed as every request to it would (nothing listening at the URL, a request rejected as
        malformed); None otherwise."""
        failure = self._permanent_failure
        if failure is None or self._limit.answered or self._other_failures:
            return None
        what = "rejected the request" if failure.message.startswith("HTTP") else "cannot be reached"
        return f"teacher {self.where()} {what}: {failure.message} ({self._hint(failure)})"

    def _hint(self, failure: Failure) -> str:
        key_env = " or ".join(f"${name}" for name in self.api_key_envs) or "the environment"
        return failure.hint.format(key_env=key_env) if failure.hint else "check the model name, base_url and API key"

    def close(self) -> None:
        if self._loop is not None:
            if self._client is not None:
                client, self._client = self._client, None
                try:
                    self._loop.run(self._close_client(client))
                except Exception as err:  # noqa: BLE001 - closing must not mask the run's outcome
                    log.debug("closing %s client: %s", self.backend, err)
            self._loop.stop()
            self._loop = None
        if self.cache is not None:
            self.cache.close()
            self.cache = None

    def __enter__(self) -> APITeacher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- scheduling --------------------------------------------------------------------------------
    async def _run(self, requests: list[ContinuationRequest], spec: SamplingSpec) -> list[ContinuationResult]:
        if self._client is None:
            self._client = self._create_client()
        results: list[ContinuationResult | None] = [None] * len(requests)
        groups: dict[int, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(req.trajectory, []).append(i)
        ordered = [sorted(idxs, key=lambda i: (len(requests[i].prefix), i)) for idxs in groups.values()]

        async def one(i: int) -> None:
            results[i] = await self._fulfil(requests[i], spec)

        async def trajectory(idxs: list[int]) -> None:
            if self.options.dispatch == "sequential":
                for i in idxs:
                    await one(i)
                return
            await one(idxs[0])  # warm the server's prefix cache with the shortest prefix
            async with asyncio.TaskGroup() as tg:
                for i in idxs[1:]:
                    tg.create_task(one(i))

        try:
            async with asyncio.TaskGroup() as tg:
                if self.options.dispatch == "parallel":
                    depth = max(len(idxs) for idxs in ordered)
                    for rank in range(depth):  # interleave trajectories, ascending prefix within each
                        for idxs in ordered:
                            if rank < len(idxs):
                                tg.create_task(one(idxs[rank]))
                else:
                    for idxs in ordered:
                        tg.create_task(trajectory(idxs))
        except BaseExceptionGroup as group:
            raise _first_teacher_error(group) from None
        assert all(r is not None for r in results)
        return [r for r in results if r is not None]

    async def _fulfil(self, request: ContinuationRequest, spec: SamplingSpec) -> ContinuationResult:
        """Exactly ``spec.n`` texts for one request, or a result with ``error``."""
        n = spec.n
        per = min(n, self.max_n_per_request or n)
        texts: dict[int, str] = {}
        usage = [0, 0]
        errors: list[str] = []

        async def call(start: int, want: int) -> bool:
            """True when the call returned everything it asked for."""
            out = await self._call(self.build_payload(request, spec, want, start), spec, start)
            if out.error is not None:
                errors.append(out.error)
                return False
            usage[0] += out.prompt_tokens
            usage[1] += out.completion_tokens
            got = out.texts[:want]
            for j, text in enumerate(got):
                texts[start + j] = text
            return len(got) == want

        complete = await call(0, per)  # alone first: warms the prefix cache for the other samples
        missing = [i for i in range(n) if i not in texts]
        if missing and not errors and complete:  # the server honours n: ask for the rest in groups of ``per``
            calls = [(missing[k], min(per, len(missing) - k)) for k in range(0, len(missing), per)]
            async with asyncio.TaskGroup() as tg:
                for start, want in calls:
                    tg.create_task(call(start, want))
            missing = [i for i in range(n) if i not in texts]
        rounds = 0
        while missing and not errors and rounds < self.options.max_topup_rounds:
            rounds += 1
            self._warn_short(len(texts), n)
            self.ledger.record_topup(len(missing))
            async with asyncio.TaskGroup() as tg:
                for i in missing:
                    tg.create_task(call(i, 1))
            missing = [i for i in range(n) if i not in texts]
        if errors:
            return ContinuationResult(prompt_tokens=usage[0], completion_tokens=usage[1], error=errors[0])
        if missing:
            return ContinuationResult(
                prompt_tokens=usage[0],
                completion_tokens=usage[1],
                error=f"teacher returned {len(texts)} of {n} continuations after {rounds} top-up rounds",
            )
        final = [self.postprocess(request, texts[i]) for i in range(n)]
        if n > 1 and len(set(final)) == 1:
            self._note_identical(n)
        return ContinuationResult(texts=final, prompt_tokens=usage[0], completion_tokens=usage[1])

    def _note_identical(self, n: int) -> None:
        self.ledger.record_identical()
        if not self._warned_identical:
            self._warned_identical = True
            log.warning(
                "%s returned %d identical continuations for one chunk: is the server sampling? (e.g. `transformers "
                "serve` samples only when the model's generation_config has do_sample=True); identical samples "
                "collapse k_sem to 0 or N",
                self.name,
                n,
            )

    def _warn_short(self, got: int, n: int) -> None:
        if not self._warned_short:
            self._warned_short = True
            log.warning(
                "%s returned fewer continuations than asked (%d of %d); topping up with one-sample requests "
                "(set max_n_per_request=1 to skip the short multi-sample requests)",
                self.name,
                got,
                n,
            )

    async def _call(self, payload: dict[str, Any], spec: SamplingSpec, sample_index: int) -> _CallOutcome:
        """One logical request: cache, then HTTP with retries. Raises TeacherError (budget, fatal)."""
        if self.cache is None:
            return await self._send_with_retries(payload, "")
        sampling = {"temperature": spec.temperature, "top_p": spec.top_p, "seed": spec.seed, "sample": sample_index}
        key = cache_key(self.backend, self.model, self.response_cache_payload(payload), sampling)
        hit = self.cache.get(key)
        if hit is not None:
            self.ledger.record_cache_hit()
            return _CallOutcome(
                texts=hit.texts, prompt_tokens=hit.prompt_tokens, completion_tokens=hit.completion_tokens
            )
        pending = self._in_flight.get(key)
        if pending is not None:  # the same draw is being fetched: share its answer or its error
            # shielded: cancelling this request must not cancel the sender's; the sender is cancelled only when
            # its whole batch is (a TaskGroup torn down), and then so is this request
            out = await asyncio.shield(pending)
            self.ledger.record_cache_hit()
            return out
        owned: asyncio.Future[_CallOutcome] = asyncio.get_running_loop().create_future()
        self._in_flight[key] = owned
        try:
            out = await self._send_with_retries(payload, key)
        except asyncio.CancelledError:
            owned.cancel()
            raise
        except BaseException as exc:
            owned.set_exception(exc)
            owned.exception()  # marked retrieved: the sender raises it; requests sharing it raise it too
            raise
        else:
            owned.set_result(out)
        finally:
            del self._in_flight[key]
        return out

    async def _send_with_retries(self, payload: dict[str, Any], key: str) -> _CallOutcome:
        """HTTP with retries; a success is stored under ``key`` when the cache is on."""
        opts = self.options
        for attempt in range(opts.max_retries + 1):
            self.ledger.check()
            async with self._limit.hold() as slot:
                self.ledger.check()  # the cap may have been reached while waiting for a slot
                self.ledger.record_request()
                started = time.perf_counter()
                try:
                    raw = await asyncio.wait_for(self._send(self._client, payload), opts.timeout_s)
                except Exception as exc:  # noqa: BLE001 - classified below; unknown ones re-raised
                    failure = classify_exception(exc, self.transient_exceptions)
                    if failure is None:
                        raise
                    slot.overloaded = failure.overload
                else:
                    latency = time.perf_counter() - started
                    slot.latency_s = latency
                    prompt_tokens = raw.prompt_tokens or estimate_tokens(str(payload))
                    completion_tokens = raw.completion_tokens or sum(estimate_tokens(t) for t in raw.texts)
                    self.ledger.record_success(
                        prompt_tokens, completion_tokens, latency, raw.cached_tokens, raw.cache_write_tokens
                    )
                    if self.cache is not None and raw.texts:
                        try:
                            self.cache.put(
                                key,
                                self.backend,
                                self.model,
                                CachedResponse(raw.texts, prompt_tokens, completion_tokens),
                            )
                        except Exception as err:  # noqa: BLE001 - a full disk must not stop training
                            log.warning("teacher cache write failed: %s", err)
                    return _CallOutcome(
                        texts=raw.texts, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens
                    )
            if failure.fatal:
                self.ledger.record_failure()
                raise TeacherError(f"teacher {self.where()}: {failure.message} ({self._hint(failure)})")
            if not failure.retryable or attempt == opts.max_retries:
                self.ledger.record_failure()
                if failure.permanent:
                    self._permanent_failure = self._permanent_failure or failure
                else:
                    self._other_failures += 1
                tries = attempt + 1
                return _CallOutcome(error=f"{failure.message} (after {tries} attempt{'s' if tries > 1 else ''})")
            self.ledger.record_retry()
            await asyncio.sleep(self._backoff(attempt, failure.retry_after_s))
        raise AssertionError("unreachable")

    def _backoff(self, attempt: int, retry_after_s: float | None) -> float:
        opts = self.options
        if retry_after_s is not None:
            wait = min(retry_after_s, opts.max_retry_after_s)
            return wait + self._rng.uniform(0, 0.1 * wait)  # a little jitter so clients do not return in lockstep
        ceiling = min(opts.backoff_max_s, opts.backoff_base_s * (2**attempt))
        return self._rng.uniform(ceiling / 2, ceiling)


__all__ = [
    "APITeacher",
    "BudgetLedger",
    "Failure",
    "LoopThread",
    "RawResponse",
    "RuntimeOptions",
    "classify_exception",
    "derive_seed",
    "parse_retry_after",
    "resolve_api_key",
]

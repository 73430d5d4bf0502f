"""How many requests an API teacher keeps in flight: a fixed number, or a limit that follows the server.

A server that answers one request at a time (``transformers serve``), or a busy one, makes every request in
flight beyond the few it can finish within the timeout wait in its queue until it times out; the retry then
queues again behind the requests the server is still working on for clients that gave up. Sending fewer at
once loses nothing on such a server (it is busy either way) and keeps each request's wait under the timeout.
An HTTP client cannot see how long a request waited in the server's queue and how long the server worked on
it, so the limiter keeps that queue short instead:

* **Slow start.** The limit starts at ``min_concurrency`` and grows by one for every quick answer (doubling
  each round trip) until the latency shows queueing: an answer more than ``SLOW_START_EXIT`` times the
  smallest latency seen recently (the delay-based exit of TCP's HyStart), or any decrease.
* **Additive increase.** After that, one more slot per window of ``limit`` answers, counted only from requests
  sent while every slot was taken (a limit that was not used is not evidence that a larger one works).
* **Multiplicative decrease.** The limit halves (to no less than ``min_concurrency``) on a sign of overload: a
  timeout, a 408/429/502/503/504/529, a dropped connection, or an answer that took more than
  ``LATENCY_HEADROOM`` of the timeout (the requests queued behind it would time out). Only once per round
  trip: a request sent before the last decrease does not decrease the limit again.

On a server that works on one request at a time the limit so saws between about a quarter and a half of
``timeout_s / service time``, and no request waits long enough to time out. A server whose latency does not
grow with the requests in flight (a large API) sees no decrease until it answers 429. Half the timeout is the
latency budget: a teacher whose answers normally take longer than that needs a larger ``timeout_s``.

``max_concurrency`` is the ceiling; with ``adaptive_concurrency=False`` the limit stays at it (a plain
semaphore). Waiting requests get slots in the order they asked (the runtime's ascending-prefix dispatch).
Counted: the current limit (``teacher/concurrency``, logged after every step) and the number of decreases
(``teacher/concurrency_reductions``; ``teacher/total_concurrency_reductions`` in the run log).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

SLOW_START_EXIT = 1.5  # leave slow start once an answer takes this many times the smallest latency
LATENCY_HEADROOM = 0.5  # an answer after more than this fraction of the timeout halves the limit
DECREASE = 0.5  # the multiplicative decrease
LATENCY_WINDOW = 200  # the smallest latency is taken over this many recent answers


@dataclass
class Slot:
    """One request's hold on the limit; the runtime sets ``latency_s`` or ``overloaded`` before releasing it."""

    epoch: int  # the number of decreases when the request went out
    full: bool  # every slot was taken once this one was
    latency_s: float | None = None  # answered after this many seconds
    overloaded: bool = False  # failed with a sign of overload


class ConcurrencyLimit:
    """The requests in flight of one teacher, within one asyncio event loop (not thread-safe)."""

    def __init__(self, ceiling: int, floor: int = 1, adaptive: bool = True, timeout_s: float | None = None) -> None:
        if not 1 <= floor <= ceiling:
            raise ValueError(f"need 1 <= min_concurrency <= max_concurrency, got {floor} and {ceiling}")
        self.ceiling = ceiling
        self.floor = floor
        self.adaptive = adaptive
        self.latency_ceiling_s = LATENCY_HEADROOM * timeout_s if timeout_s else None
        self.limit = float(floor if adaptive else ceiling)
        self.slow_start = adaptive
        self.in_flight = 0
        self.reductions = 0
        self.answered = 0  # requests answered (whatever the limit did with them)
        self._epoch = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)

    @property
    def allowed(self) -> int:
        """Requests that may be in flight now."""
        return max(self.floor, min(self.ceiling, int(self.limit)))

    async def acquire(self) -> Slot:
        """Wait for a slot (first come, first served)."""
        if self._waiters or self.in_flight >= self.allowed:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            try:
                await fut  # resolved by _grant, which counted this request in flight
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled():  # granted, then cancelled before running: give it back
                    self.in_flight -= 1
                    self._grant()
                raise
        else:
            self.in_flight += 1
        return Slot(epoch=self._epoch, full=self.in_flight >= self.allowed)

    @contextlib.asynccontextmanager
    async def hold(self) -> AsyncIterator[Slot]:
        """``async with limit.hold() as slot:`` one request (set ``slot.latency_s`` or ``slot.overloaded``)."""
        slot = await self.acquire()
        try:
            yield slot
        finally:
            self.release(slot)

    def release(self, slot: Slot) -> None:
        """Give the slot back, learning from how its request went."""
        self.in_flight -= 1
        self.answered += slot.latency_s is not None
        if self.adaptive:
            if slot.overloaded:
                self._decrease(slot)
            elif slot.latency_s is not None:
                self._answered(slot, slot.latency_s)
        self._grant()

    def metrics(self) -> dict[str, float]:
        return {"teacher/concurrency": float(self.allowed), "teacher/concurrency_reductions": float(self.reductions)}

    # -- the rules ---------------------------------------------------------------------------------
    def _answered(self, slot: Slot, latency_s: float) -> None:
        self._latencies.append(latency_s)
        if self.latency_ceiling_s is not None and latency_s > self.latency_ceiling_s:
            self._decrease(slot)
            return
        if not slot.full:
            return
        fastest = min(self._latencies)
        if self.slow_start and fastest > 0 and latency_s > SLOW_START_EXIT * fastest:
            self.slow_start = False  # queueing has begun: grow additively from here
        self.limit = min(float(self.ceiling), self.limit + (1.0 if self.slow_start else 1.0 / self.limit))

    def _decrease(self, slot: Slot) -> None:
        if slot.epoch != self._epoch:  # sent before the last decrease, which already answered this overload
            return
        self.slow_start = False
        before = self.allowed
        self.limit = max(float(self.floor), self.limit * DECREASE)
        if self.allowed < before:  # (at the floor there is nothing left to take away)
            self._epoch += 1
            self.reductions += 1

    def _grant(self) -> None:
        while self._waiters and self.in_flight < self.allowed:
            fut = self._waiters.popleft()
            if fut.done():  # its task was cancelled while waiting
                continue
            self.in_flight += 1
            fut.set_result(None)

"""Verdicts decided outside the process that ran the candidate.

A graded run is two sandboxed processes (:mod:`omniopd.evaluation.sandbox`) and this parent between
them:

* the **candidate** (:mod:`omniopd.evaluation.child_candidate`) loads the model-written code and
  answers calls to its entry point with plain data (:mod:`omniopd.evaluation.wire`);
* the **judge** (:mod:`omniopd.evaluation.child_judge`) holds the tests and the expected outputs,
  never runs model-written code, and decides the verdict from the plain data it gets back;
* the **parent** (this module) relays each call from the judge to the candidate and the reply back,
  and keeps the clock: it times the candidate's loading and every call itself, enforces the budget and
  the per-call limits, and ends the run when a limit is passed, the candidate dies, or either side
  breaks the protocol. A run whose clock stalled across a deadline is graded again (``judge_run``).

So a candidate cannot read the expected values or the comparison (they are in another process, and
the file system it sees holds no dataset), cannot replace the checker or walk up to the harness's
frames (there are none in its process), cannot pass with an object whose ``__eq__`` always says yes
(only plain data leaves its process; see :mod:`omniopd.evaluation.wire`), cannot forge a verdict by
printing (its output is discarded, and the verdict travels on the judge's channel), and cannot buy
time by stopping a clock it does not hold. What it can do is compute the right answer.
"""

from __future__ import annotations

import os
import select
import time
from dataclasses import dataclass, field, replace

from omniopd.evaluation import wire
from omniopd.evaluation.sandbox import SandboxLimits, SandboxProcess, program_text

__all__ = ["JudgeLimits", "Verdict", "judge_run"]


@dataclass(frozen=True)
class JudgeLimits:
    """Limits of one graded run.

    ``candidate_seconds``: the candidate's whole budget (loading plus every call), or None when the
    judge sends it (MBPP+). ``judge_seconds``: wall clock for the whole run, a backstop (the judge is
    trusted, but a reference solution may be slow). ``candidate`` and ``judge``: the processes' other
    limits (memory, processes, files)."""

    candidate_seconds: float | None = 3.0
    judge_seconds: float = 60.0
    candidate: SandboxLimits = field(default_factory=SandboxLimits)
    judge: SandboxLimits = field(default_factory=SandboxLimits)


@dataclass(frozen=True)
class Verdict:
    passed: bool
    status: str  # passed, failed, timeout, killed, error
    detail: str
    seconds: float  # wall clock of the whole run
    candidate_seconds: float  # the candidate's own time as the parent measured it
    info: dict = field(default_factory=dict)  # the judge's verdict message (split, index, base_passed, ...)
    isolation: tuple[str, ...] = ()
    reference: dict | None = field(default=None, repr=False)  # expected outputs the judge offered for caching


class _End(Exception):
    def __init__(self, status: str, detail: str, info: dict | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.info = status, detail, info or {}


class _Peer:
    """The parent's end of one child's channel: framed reads, non-blocking buffered writes."""

    def __init__(self, proc: SandboxProcess, name: str) -> None:
        self.proc, self.name = proc, name
        self.reader = wire.FrameReader()
        self.out = bytearray()
        self.inbox: list[dict] = []
        self.closed = False
        assert proc.write_fd is not None
        os.set_blocking(proc.write_fd, False)

    def send(self, message: dict) -> None:
        self.out += wire.pack(message)
        self.flush()

    def flush(self) -> None:
        while self.out and not self.closed:
            try:
                n = os.write(self.proc.write_fd, self.out[: 1 << 20])  # type: ignore[arg-type]
            except BlockingIOError:
                return
            except (BrokenPipeError, OSError):
                self.closed = True
                return
            del self.out[:n]

    def read(self) -> None:
        try:
            data = os.read(self.proc.read_fd, 1 << 20)  # type: ignore[arg-type]
        except OSError:
            data = b""
        if not data:
            self.closed = True
            return
        try:
            self.inbox.extend(self.reader.feed(data))
        except wire.ProtocolError as exc:
            raise _End(
                "failed" if self.name == "candidate" else "error", f"the {self.name} broke the protocol: {exc}"
            ) from None


# At most this many runs of one grade whose clock stalled; then it is a timeout (a machine that busy cannot time it).
STALL_TRIES = 3


def judge_run(judge_payload: dict, code: str, entry_point: str, limits: JudgeLimits) -> Verdict:
    """Run ``code`` against the judge's tests; never raises for anything the code does.

    The parent times the candidate in one thread among the grading threads. When that thread did not
    run across a deadline (another thread holding the interpreter, a loaded machine) and then finds the
    candidate's answer waiting, it cannot tell whether the answer came in time; that run is thrown
    away and the grade run again, at most ``STALL_TRIES`` times, so a verdict is always one whose
    every deadline the parent watched."""
    for _ in range(STALL_TRIES):
        verdict = _judge_once(judge_payload, code, entry_point, limits)
        if verdict.status != "stalled":
            return verdict
    return replace(verdict, status="timeout", detail=f"{verdict.detail}; the same in {STALL_TRIES} runs, so a timeout")


def _judge_once(judge_payload: dict, code: str, entry_point: str, limits: JudgeLimits) -> Verdict:
    modules = {"omniopd_wire": program_text("wire.py")}
    candidate = SandboxProcess(
        program_text("child_candidate.py"),
        limits.candidate,
        channel=True,
        modules=modules,
        payload={"code": code, "entry_point": entry_point},
    )
    judge = SandboxProcess(
        program_text("child_judge.py"), limits.judge, channel=True, modules=modules, payload=judge_payload
    )
    start = time.monotonic()
    used, reference = 0.0, None
    try:
        for proc in (candidate, judge):
            if not proc.start():
                return Verdict(
                    False, "error", proc.start_error or "the sandbox did not start", time.monotonic() - start, 0.0
                )
        run = _Run(_Peer(candidate, "candidate"), _Peer(judge, "judge"), limits, start)
        try:
            run.loop()
            raise AssertionError("unreachable")
        except _End as end:
            status, detail, info = end.status, end.detail, end.info
        used, reference = run.used, run.reference
        if status == "candidate-died":
            status, detail = _death(candidate, detail)
    finally:
        candidate.kill()
        judge.kill()
    cand_result = candidate.finish(exited=True)
    judge_result = judge.finish(exited=True)
    if status == "error" and "judge" in detail and judge_result.detail:
        detail = f"{detail}\n{judge_result.detail}"
    isolation = tuple(x for x in cand_result.isolation if x in judge_result.isolation)
    return Verdict(status == "passed", status, detail, time.monotonic() - start, used, info, isolation, reference)


def _death(candidate: SandboxProcess, detail: str) -> tuple[str, str]:
    """Status and detail when the candidate's process ended in the middle of the run."""
    result = candidate.finish(exited=True)
    if result.status in ("timeout", "killed"):
        return result.status, f"{detail}: {result.detail.splitlines()[0] if result.detail else result.status}"
    return "failed", detail


class _Run:
    def __init__(self, cand: _Peer, judge: _Peer, limits: JudgeLimits, start: float) -> None:
        self.cand, self.judge, self.limits, self.start = cand, judge, limits, start
        self.budget = limits.candidate_seconds
        self.used = 0.0  # candidate seconds spent (loading and calls)
        self.state = "starting"  # starting, loading, ready, calling
        self.since = 0.0  # when loading or the current call began
        # A time by which the candidate's pipe was seen empty (no answer yet) in the current wait: an
        # answer found after a deadline came late only when this is past the deadline.
        self.seen_empty = 0.0
        self.call_limit: float | None = None
        self.label = ""
        self.pending: dict | None = None  # a call from the judge waiting for the candidate to be ready
        self.calls = 0
        self.reference: dict | None = None

    # the candidate's clock
    def _deadline(self) -> float | None:
        if self.state not in ("loading", "calling"):
            return None
        left = None if self.budget is None else self.budget - self.used
        if self.state == "calling" and self.call_limit is not None:
            left = self.call_limit if left is None else min(left, self.call_limit)
        if left is None:
            return None
        return self.since + max(0.0, left)

    def _time_out(self) -> None:
        if self.state == "loading":
            raise _End("timeout", f"time limit exceeded while loading the program (budget {self.budget:g}s)")
        if self.call_limit is not None and (self.budget is None or self.call_limit <= self.budget - self.used):
            raise _End("timeout", f"{self.label}: time limit of {self.call_limit:.2f}s exceeded")
        raise _End(
            "timeout", f"{self.label}: the program's time budget of {self.budget:g}s (loading and all calls) ran out"
        )

    def _forward_call(self, message: dict) -> None:
        self.calls += 1
        self.label = str(message.get("label") or f"call #{self.calls}")[:100]
        limit = message.get("limit")
        self.call_limit = float(limit) if isinstance(limit, (int, float)) else None
        call = {
            "op": "call",
            "args": message.get("args"),
            "digest": bool(message.get("digest")),
            "project": message.get("project"),
        }
        if message.get("kwargs") is not None:
            call["kwargs"] = message["kwargs"]
        self.state = "calling"
        self.cand.send(call)
        self.since = self.seen_empty = time.monotonic()  # after the send: the parent's delays are not the candidate's

    def on_candidate(self, message: dict) -> None:
        op = message.get("op")
        now = time.monotonic()
        if op == "loading" and self.state == "starting":
            self.state, self.since, self.seen_empty = "loading", now, now
        elif op == "ready" and self.state == "loading":
            self.used += now - self.since
            self.state = "ready"
            if self.pending is not None:
                self._forward_call(self.pending)
                self.pending = None
        elif op == "load_failed" and self.state == "loading":
            raise _End("failed", f"the program failed to load: {str(message.get('error', ''))[:2000]}")
        elif op in ("returned", "raised") and self.state == "calling":
            self.used += now - self.since
            self.state = "ready"
            reply = {"op": op}
            for key in ("value", "digest", "error"):
                if key in message:
                    reply[key] = message[key]
            self.judge.send(reply)
        else:
            raise _End("failed", f"the program sent an unexpected message ({str(op)[:40]!r} while {self.state})")

    def on_judge(self, message: dict) -> None:
        op = message.get("op")
        if op == "verdict":
            status = str(message.get("status", "failed"))
            passed = bool(message.get("passed")) and status == "passed"
            raise _End(
                "passed" if passed else (status if status != "passed" else "failed"),
                str(message.get("detail", "")),
                message,
            )
        if op == "budget" and self.limits.candidate_seconds is None:
            self.budget = float(message["seconds"])
        elif op == "reference":
            self.reference = message.get("rows")
        elif op == "call":
            if self.state == "ready":
                self._forward_call(message)
            elif self.state in ("starting", "loading") and self.pending is None:
                self.pending = message
            else:
                raise _End("error", f"the judge called while the candidate was {self.state}")
        else:
            raise _End("error", f"the judge sent an unexpected message {str(op)[:40]!r}")

    def _past_deadline(self, deadline: float) -> None:
        """The deadline has passed by this thread's clock: a time-out, unless this thread did not
        watch across it (the candidate's pipe was last seen empty before the deadline) and a whole
        answer is waiting now, which may have come in time; then the run ends as ``stalled``."""
        if self.seen_empty < deadline and not self.cand.closed:
            poller = select.poll()
            poller.register(self.cand.proc.read_fd, select.POLLIN)  # type: ignore[arg-type]
            if poller.poll(0):
                self.cand.read()
            if self.cand.inbox:
                raise _End(
                    "stalled",
                    f"{self.label or 'loading'}: the grader's clock stalled {time.monotonic() - self.seen_empty:.2f}s "
                    "across its deadline, and an answer was waiting",
                )
        self._time_out()

    def loop(self) -> None:
        judge_deadline = self.start + self.limits.judge_seconds
        while True:
            for peer, handle in ((self.judge, self.on_judge), (self.cand, self.on_candidate)):
                while peer.inbox:
                    handle(peer.inbox.pop(0))
            if self.judge.closed and not self.judge.inbox:
                raise _End("error", "the judge ended without a verdict")
            if self.cand.closed and not self.cand.inbox and self.state != "ready":
                where = {
                    "starting": "before it started",
                    "loading": "while loading",
                    "calling": f"during {self.label}",
                }[self.state]
                raise _End("candidate-died", f"the program's process ended {where}")
            now = time.monotonic()
            deadline = self._deadline()
            if deadline is not None and now >= deadline:
                self._past_deadline(deadline)
            if now >= judge_deadline:
                raise _End("timeout", f"the run exceeded its wall-clock limit of {self.limits.judge_seconds:g}s")
            wait = min(x for x in (deadline, judge_deadline) if x is not None) - now
            poller = select.poll()
            fds = {}
            for peer in (self.cand, self.judge):
                if peer.closed:
                    continue
                poller.register(peer.proc.read_fd, select.POLLIN)  # type: ignore[arg-type]
                fds[peer.proc.read_fd] = peer
                if peer.out:
                    poller.register(peer.proc.write_fd, select.POLLOUT)  # type: ignore[arg-type]
                    fds[peer.proc.write_fd] = peer
            timeout_ms = max(1, int(wait * 1000) + 1)
            before = time.monotonic()
            events = poller.poll(timeout_ms)
            if not events:  # timed out: nothing came in, at least until this long after `before`
                self.seen_empty = max(self.seen_empty, before + timeout_ms / 1000)
            elif all(fd != self.cand.proc.read_fd for fd, _ in events):
                self.seen_empty = max(self.seen_empty, before)
            for fd, event in events:
                peer = fds[fd]
                if fd == peer.proc.write_fd:
                    peer.flush()
                elif event & (select.POLLIN | select.POLLHUP | select.POLLERR):
                    peer.read()

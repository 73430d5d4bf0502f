"""Which API errors are worth retrying, which stop the run, and how long to wait (Retry-After).

* Retried: 408/409/425/429/5xx/529, our own timeout, and connection errors that say nothing about the server
  being gone (a reset, a dropped connection, a read timeout).
* Not retried: a connection that cannot be made because nothing answers at that address (connection refused,
  host not found, network unreachable) -- a wrong or dead ``base_url`` refuses every attempt alike; a request the
  server rejects as malformed (400, 405, 422); any other 4xx.
* Fatal at once (the run stops with one line): 401/403 (the key) and 404 (the model or the URL).

Two marks guide the rest of the runtime: ``overload`` (a timeout, 408, 429, 502/503/504, 529, a dropped
connection: too many requests in flight, so the adaptive concurrency limit shrinks) and ``permanent`` (a failure
every request to this server would meet: unreachable, rejected, or fatal; a start-of-run check in which every
request fails that way stops the run).
"""

from __future__ import annotations

import email.utils
import errno
import re
import socket
import time
from dataclasses import dataclass
from typing import Any

RETRYABLE_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504, 529})
OVERLOAD_STATUS = frozenset({408, 429, 502, 503, 504, 529})  # the server or a gateway before it is too busy
FATAL_STATUS = frozenset({401, 403, 404})
REJECTED_STATUS = frozenset({400, 405, 422})  # a malformed request (an option the server does not accept)
_HINTS = {
    401: "check the API key in {key_env}",
    403: "check the API key in {key_env} and its access to this model",
    404: "unknown model or wrong URL: check teacher.model and teacher.base_url",
    "rejected": "the server does not accept the request: check teacher options such as extra_body, send_seed, "
    "max_tokens_field and send_sampling_params",
    "unreachable": "is the server running? check teacher.base_url",
}
_UNREACHABLE_ERRNO = frozenset({errno.ECONNREFUSED, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EADDRNOTAVAIL})


@dataclass
class Failure:
    retryable: bool
    fatal: bool
    message: str
    retry_after_s: float | None = None
    overload: bool = False  # a sign of too many requests in flight: the adaptive limit shrinks
    permanent: bool = False  # every request to this server would fail alike (unreachable, rejected, fatal)
    hint: str = ""  # what to check, for the one-line error ("{key_env}": the key's environment variable)


def parse_retry_after(headers: Any) -> float | None:
    """Seconds from ``retry-after-ms`` or ``retry-after`` (delta-seconds or an HTTP date)."""
    if headers is None:
        return None
    try:
        ms = headers.get("retry-after-ms")
        if ms is not None:
            return max(0.0, float(ms) / 1000.0)
        value = headers.get("retry-after")
    except (AttributeError, ValueError):
        return None
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


_DURATION = re.compile(r"^\s*([0-9.]+)s\s*$")


def _retry_delay_from_body(details: Any) -> float | None:
    """Gemini puts ``{"@type": ".../RetryInfo", "retryDelay": "12s"}`` in ``error.details``."""
    if not isinstance(details, dict):
        return None
    err = details.get("error", details)
    for item in err.get("details", []) if isinstance(err, dict) else []:
        if isinstance(item, dict) and isinstance(item.get("retryDelay"), str):
            m = _DURATION.match(item["retryDelay"])
            if m:
                return float(m.group(1))
    return None


def http_status(exc: BaseException) -> int | None:
    status = getattr(exc, "status_code", None)
    if isinstance(status, int):
        return status
    code = getattr(exc, "code", None)  # google.genai.errors.APIError
    if isinstance(code, int) and hasattr(exc, "details"):
        return code
    return None


def unreachable_cause(exc: BaseException) -> str | None:
    """ "connection refused" (or "host not found", ...) when ``exc`` was caused by a connection that could not be
    made because nothing answers at the address; None otherwise. The SDKs wrap the socket error a few times
    (``APIConnectionError`` from ``httpx.ConnectError`` from ``OSError``), so the whole chain is searched."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        err = stack.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(err, ConnectionRefusedError):
            return "connection refused"
        if isinstance(err, socket.gaierror):
            return f"host not found ({err.strerror or err})"
        if isinstance(err, OSError) and not isinstance(err, TimeoutError) and err.errno in _UNREACHABLE_ERRNO:
            return f"cannot connect ({err.strerror or err})"
        if isinstance(err, BaseExceptionGroup):
            stack.extend(err.exceptions)
        stack.extend([err.__cause__, err.__context__])
    return None


def _one_line(text: str, limit: int = 300) -> str:
    return " ".join(text.split())[:limit]


def classify_exception(exc: BaseException, transient: tuple[type[BaseException], ...]) -> Failure | None:
    """How to treat an exception from one request; None for an unknown exception (a bug: re-raise)."""
    if isinstance(exc, TimeoutError):  # asyncio.wait_for's timeout
        return Failure(retryable=True, fatal=False, message="timeout", overload=True)
    status = http_status(exc)
    if status is not None:
        response = getattr(exc, "response", None)
        retry_after = parse_retry_after(getattr(response, "headers", None))
        if retry_after is None:
            retry_after = _retry_delay_from_body(getattr(exc, "details", None) or getattr(exc, "body", None))
        message = f"HTTP {status}: {_one_line(str(exc))}"
        if status in FATAL_STATUS:
            return Failure(retryable=False, fatal=True, message=message, permanent=True, hint=_HINTS[status])
        rejected = status in REJECTED_STATUS
        return Failure(
            retryable=status in RETRYABLE_STATUS,
            fatal=False,
            message=message,
            retry_after_s=retry_after,
            overload=status in OVERLOAD_STATUS,
            permanent=rejected,
            hint=_HINTS["rejected"] if rejected else "",
        )
    if transient and isinstance(exc, transient):
        cause = unreachable_cause(exc)
        if cause is not None:
            return Failure(retryable=False, fatal=False, message=cause, permanent=True, hint=_HINTS["unreachable"])
        return Failure(
            retryable=True, fatal=False, message=f"{type(exc).__name__}: {_one_line(str(exc))}", overload=True
        )
    return None

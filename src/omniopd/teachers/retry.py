"""Which API errors are worth retrying, which stop the run, and how long to wait (Retry-After)."""

from __future__ import annotations

import email.utils
import re
import time
from dataclasses import dataclass
from typing import Any

RETRYABLE_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504, 529})
FATAL_STATUS = frozenset({401, 403, 404})

@dataclass
class Failure:
    retryable: bool
    fatal: bool
    message: str
    retry_after_s: float | None = None


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


def classify_exception(exc: BaseException, transient: tuple[type[BaseException], ...]) -> Failure | None:
    """How to treat an exception from one request; None for an unknown exception (a bug: re-raise)."""
    if isinstance(exc, TimeoutError):  # asyncio.wait_for's timeout
        return Failure(retryable=True, fatal=False, message="timeout")
    status = http_status(exc)
    if status is not None:
        response = getattr(exc, "response", None)
        retry_after = parse_retry_after(getattr(response, "headers", None))
        if retry_after is None:
            retry_after = _retry_delay_from_body(getattr(exc, "details", None) or getattr(exc, "body", None))
        message = f"HTTP {status}: {str(exc)[:300]}"
        if status in FATAL_STATUS:
            return Failure(retryable=False, fatal=True, message=message)
        return Failure(retryable=status in RETRYABLE_STATUS, fatal=False, message=message, retry_after_s=retry_after)
    if transient and isinstance(exc, transient):
        return Failure(retryable=True, fatal=False, message=f"{type(exc).__name__}: {str(exc)[:300]}")
    return None

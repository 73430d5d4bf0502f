"""A local fake of four text-generation APIs, for tests and the teacher I/O benchmark.

One threaded ``http.server`` on 127.0.0.1 (a random free port) answers in each provider's documented
wire format, so the official SDKs (``openai``, ``anthropic``, ``google-genai``) can be pointed at it
unchanged:

=====================  ==========================================  ===========================
route                  path                                        SDK base_url
=====================  ==========================================  ===========================
``openai.completions``  ``POST /v1/completions``                    ``server.url + "/v1"``
``openai.chat``         ``POST /v1/chat/completions``               ``server.url + "/v1"``
``anthropic.messages``  ``POST /v1/messages``                       ``server.url``
``gemini.generate``     ``POST /{version}/models/{model}:generateContent``  ``server.url``
=====================  ==========================================  ===========================

plus ``GET /health`` and ``GET /v1/models``. Every request is recorded (route, path, JSON body,
headers) so a test can assert exactly what an SDK sent.

Faults are injected into a FIFO queue and consumed one per matching request: a status error (429 with
``Retry-After``, 500, ...), a slow answer (sleeps past the client's timeout, then answers), or fewer
choices/candidates than asked. ``max_choices`` caps every answer permanently, the way ``transformers
serve`` always returns one choice whatever ``n`` asks. ``latency_s`` delays every answer (benchmark).
``max_in_flight`` makes the server work on at most that many requests at a time (1: one by one, as
``transformers serve``); the others wait their turn in arrival order, and a request whose client gave up
waiting is still worked on, as by a server that does not notice a closed connection.

Generated text is a few filler words per requested token (capped at 64), deterministic per request body
and arrival order, so N samples of one request differ from each other.

Prompt caching follows each provider's documented rules (``omniopd.teachers.prompt_cache``): Anthropic caches
at ``cache_control`` breakpoints (4 at most, a 20-block lookback, entries usable once the answer that writes
them begins) and refuses what the API refuses (a prefill ending in whitespace, an empty text block, a fifth
breakpoint) with a 400; OpenAI (in steps of 128 tokens) and Gemini cache every long enough prompt on their own.
Prompt tokens are counted at 4 characters each; usage carries each provider's cache fields
(``cache_read_input_tokens``/``cache_creation_input_tokens``, ``prompt_tokens_details.cached_tokens``,
``cachedContentTokenCount``). The minimum cached length is each model's documented one (``teachers.prices``)
unless ``cache_min_tokens`` is set; each request's cache usage is recorded with it.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from omniopd.teachers.prices import Provider, min_cache_tokens
from omniopd.teachers.prompt_cache import (
    OPENAI_INCREMENT,
    BreakpointCache,
    CacheUsage,
    PrefixCache,
    approx_tokens,
    chat_prompt_text,
    gemini_prompt_text,
    message_blocks,
)

_WORDS = [
    "the",
    "sum",
    "of",
    "two",
    "and",
    "three",
    "is",
    "five",
    "so",
    "we",
    "add",
    "the",
    "numbers",
    "then",
    "multiply",
    "by",
    "four",
    "giving",
    "twenty",
    "next",
    "subtract",
    "seven",
    "to",
    "get",
    "thirteen",
    "which",
    "is",
    "the",
    "answer",
    "because",
    "each",
    "step",
    "follows",
]

_GEMINI_PATH = re.compile(r"^/(?P<version>[^/]+)/models/(?P<model>[^/:]+):generateContent$")


@dataclass
class Fault:
    """One injected misbehaviour, consumed by the next request whose route matches ``route``."""

    status: int | None = None  # answer with this HTTP error status
    retry_after: str | None = None  # Retry-After header value sent with ``status``
    delay_s: float = 0.0  # sleep before answering (a slow response that trips the client timeout)
    choices: int | None = None  # answer with this many choices/candidates, whatever was asked
    route: str | None = None  # None: any route

    @classmethod
    def rate_limit(cls, retry_after: float = 0.05, route: str | None = None) -> Fault:
        return cls(status=429, retry_after=f"{retry_after:g}", route=route)

    @classmethod
    def server_error(cls, status: int = 500, route: str | None = None) -> Fault:
        return cls(status=status, route=route)

    @classmethod
    def slow(cls, delay_s: float, route: str | None = None) -> Fault:
        return cls(delay_s=delay_s, route=route)

    @classmethod
    def few(cls, choices: int = 1, route: str | None = None) -> Fault:
        return cls(choices=choices, route=route)


@dataclass
class RecordedRequest:
    route: str
    path: str
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)
    usage: CacheUsage | None = None  # the prompt's tokens: in total, read from the prompt cache, written to it


def _error_body(route: str, status: int, message: str | None = None) -> dict[str, Any]:
    message = message or {429: "rate limited (fake)", 401: "bad key (fake)", 400: "bad request (fake)"}.get(
        status, "server error (fake)"
    )
    if route.startswith("anthropic"):
        kind = {
            429: "rate_limit_error",
            401: "authentication_error",
            400: "invalid_request_error",
            529: "overloaded_error",
        }.get(status, "api_error")
        return {"type": "error", "error": {"type": kind, "message": message}}
    if route.startswith("gemini"):
        state = {429: "RESOURCE_EXHAUSTED", 401: "UNAUTHENTICATED", 400: "INVALID_ARGUMENT"}.get(status, "INTERNAL")
        return {"error": {"code": status, "message": message, "status": state}}
    kind = {429: "rate_limit_exceeded", 401: "invalid_api_key", 400: "invalid_request_error"}.get(
        status, "server_error"
    )
    return {"error": {"message": message, "type": kind, "param": None, "code": kind}}


class FakeProviderServer:
    """Start with ``with FakeProviderServer() as server:`` (or ``start()``/``stop()``)."""

    def __init__(
        self,
        latency_s: float = 0.0,
        max_choices: int | None = None,
        chat_preamble: str = "",
        max_in_flight: int | None = None,
    ) -> None:
        self.latency_s = latency_s
        self.max_in_flight = max_in_flight  # requests worked on at once; None: all that arrive
        self._serving = _TurnTaking(max_in_flight) if max_in_flight else None
        self.max_choices = max_choices
        self.chat_preamble = chat_preamble  # prepended to chat and Gemini answers (instruct post-processing tests)
        self.cache_min_tokens: int | None = None  # shortest cached prompt prefix; None: each model's documented one
        self._prompt_caches: dict[Provider, BreakpointCache | PrefixCache] = {
            "anthropic": BreakpointCache(self._min_tokens("anthropic")),
            "openai": PrefixCache(self._min_tokens("openai"), increment=OPENAI_INCREMENT),
            "gemini": PrefixCache(self._min_tokens("gemini")),
        }
        self.requests: list[RecordedRequest] = []
        self._faults: deque[Fault] = deque()
        self._lock = threading.Lock()
        self._counter = 0
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> FakeProviderServer:
        server = self

        class Handler(_Handler):
            fake = server

        httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler, bind_and_activate=False)
        httpd.daemon_threads = True
        httpd.request_queue_size = 256
        httpd.allow_reuse_address = True
        httpd.server_bind()
        httpd.server_activate()
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FakeProviderServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- control ---------------------------------------------------------------------------------
    def inject(self, *faults: Fault) -> None:
        with self._lock:
            self._faults.extend(faults)

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()
            self.requests.clear()
        for cache in self._prompt_caches.values():
            cache.clear()

    # -- prompt caching --------------------------------------------------------------------------
    def _min_tokens(self, provider: Provider):
        return lambda model: self.cache_min_tokens or min_cache_tokens(model, provider)

    def prompt_cache_lookup(self, route: str, body: dict[str, Any], model: str = "") -> tuple[CacheUsage, list]:
        """The prompt's usage as the provider's cache sees it on arrival, and the writes its answer makes
        (:meth:`prompt_cache_commit`). ``ValueError``: a request the provider refuses."""
        if route == "anthropic.messages":
            blocks_cache = self._prompt_caches["anthropic"]
            assert isinstance(blocks_cache, BreakpointCache)
            return blocks_cache.lookup(str(body.get("model", "")), message_blocks(body))
        if route == "openai.completions":
            prompt = body.get("prompt") or ""
            text = prompt if isinstance(prompt, str) else json.dumps(prompt)
        elif route == "openai.chat":
            text = chat_prompt_text(body.get("messages") or [])
        else:
            text = gemini_prompt_text(body.get("contents") or [])
        provider: Provider = "gemini" if route.startswith("gemini") else "openai"
        text_cache = self._prompt_caches[provider]
        assert isinstance(text_cache, PrefixCache)
        return text_cache.lookup(model or str(body.get("model", "")), text)

    def prompt_cache_commit(self, route: str, pending: list) -> None:
        provider: Provider = (
            "anthropic" if route.startswith("anthropic") else "gemini" if route.startswith("gemini") else "openai"
        )
        self._prompt_caches[provider].commit(pending)

    def count(self, route: str | None = None) -> int:
        with self._lock:
            return sum(1 for r in self.requests if route is None or r.route == route)

    def _record_and_pop_fault(self, rec: RecordedRequest) -> tuple[Fault | None, int]:
        with self._lock:
            self.requests.append(rec)
            self._counter += 1
            for i, f in enumerate(self._faults):
                if f.route is None or f.route == rec.route:
                    del self._faults[i]
                    return f, self._counter
            return None, self._counter

    # -- answers in each wire format -------------------------------------------------------------
    def _texts(self, body: dict[str, Any], asked: int, max_tokens: int, serial: int) -> list[str]:
        rng = random.Random(f"{json.dumps(body, sort_keys=True)}#{serial}")
        words = max(1, min(int(max_tokens), 64))
        return [" " + " ".join(rng.choice(_WORDS) for _ in range(words)) for _ in range(asked)]

    def answer(
        self,
        route: str,
        body: dict[str, Any],
        fault: Fault | None,
        serial: int,
        model: str = "",
        usage: CacheUsage | None = None,
    ) -> dict[str, Any]:
        if route.startswith("openai"):
            asked = int(body.get("n") or 1)
            max_tokens = body.get("max_tokens") or body.get("max_completion_tokens") or 16
        elif route.startswith("anthropic"):
            asked, max_tokens = 1, body.get("max_tokens", 16)
        else:
            gen = body.get("generationConfig") or {}
            asked, max_tokens = int(gen.get("candidateCount") or 1), gen.get("maxOutputTokens") or 16
        given = asked
        if self.max_choices is not None:
            given = min(given, self.max_choices)
        if fault is not None and fault.choices is not None:
            given = min(given, fault.choices)
        texts = self._texts(body, given, max_tokens, serial)
        if usage is None:  # not looked up in the prompt cache: the whole prompt, uncached
            prompt = body.get("prompt") or body.get("messages") or body.get("contents")
            usage = CacheUsage(approx_tokens(prompt if isinstance(prompt, str) else json.dumps(prompt)))
        prompt_tokens = usage.prompt_tokens
        completion_tokens = sum(len(t.split()) for t in texts)
        now = int(time.time())
        if route == "openai.completions":
            return {
                "id": f"cmpl-{serial}",
                "object": "text_completion",
                "created": now,
                "model": body.get("model", ""),
                "choices": [
                    {"index": i, "text": t, "logprobs": None, "finish_reason": "length"} for i, t in enumerate(texts)
                ],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                    "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
                },
            }
        if route == "openai.chat":
            return {
                "id": f"chatcmpl-{serial}",
                "object": "chat.completion",
                "created": now,
                "model": body.get("model", ""),
                "choices": [
                    {
                        "index": i,
                        "message": {"role": "assistant", "content": self.chat_preamble + t.lstrip(), "refusal": None},
                        "logprobs": None,
                        "finish_reason": "length",
                    }
                    for i, t in enumerate(texts)
                ],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                    "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
                },
            }
        if route == "anthropic.messages":
            return {
                "id": f"msg_{serial}",
                "type": "message",
                "role": "assistant",
                "model": body.get("model", ""),
                "content": [{"type": "text", "text": texts[0]}] if texts else [],
                "stop_reason": "max_tokens",
                "stop_sequence": None,
                "usage": {
                    "input_tokens": usage.uncached_tokens,  # after the last cache hit or write
                    "cache_creation_input_tokens": usage.cache_write_tokens,
                    "cache_read_input_tokens": usage.cached_tokens,
                    "output_tokens": completion_tokens,
                },
            }
        return {
            "candidates": [
                {
                    "content": {"role": "model", "parts": [{"text": self.chat_preamble + t.lstrip()}]},
                    "finishReason": "MAX_TOKENS",
                    "index": i,
                }
                for i, t in enumerate(texts)
            ],
            "usageMetadata": {
                "promptTokenCount": prompt_tokens,
                "candidatesTokenCount": completion_tokens,
                "totalTokenCount": prompt_tokens + completion_tokens,
                "cachedContentTokenCount": usage.cached_tokens,
            },
            "modelVersion": model,
            "responseId": f"resp-{serial}",
        }


class _TurnTaking:
    """At most ``slots`` holders at once, admitted in the order they arrived (a FIFO server queue)."""

    def __init__(self, slots: int) -> None:
        self._free = slots
        self._queue: deque[threading.Event] = deque()
        self._lock = threading.Lock()

    def __enter__(self) -> None:
        turn = threading.Event()
        with self._lock:
            if self._free and not self._queue:
                self._free -= 1
                turn.set()
            else:
                self._queue.append(turn)
        turn.wait()

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            if self._queue:
                self._queue.popleft().set()  # the slot passes straight to the next in line
            else:
                self._free += 1


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real providers; every answer sets Content-Length
    fake: FakeProviderServer

    def setup(self) -> None:
        super().setup()
        # headers and body go out as two writes: without TCP_NODELAY, Nagle + delayed ACK add ~40 ms
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send_json(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
            pass

    def do_GET(self) -> None:
        if self.path == "/health":
            self._send_json(200, {"status": "ok"})
        elif self.path == "/v1/models":
            self._send_json(
                200, {"object": "list", "data": [{"id": "fake", "object": "model", "created": 0, "owned_by": "fake"}]}
            )
        else:
            self._send_json(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b"{}"
        try:
            body = json.loads(raw or b"{}")
        except json.JSONDecodeError:
            self._send_json(400, {"error": {"message": "invalid JSON"}})
            return
        path = self.path.split("?", 1)[0]
        model = ""
        if path == "/v1/completions":
            route = "openai.completions"
        elif path == "/v1/chat/completions":
            route = "openai.chat"
        elif path == "/v1/messages":
            route = "anthropic.messages"
        elif (m := _GEMINI_PATH.match(path)) is not None:
            route, model = "gemini.generate", m.group("model")
        else:
            self._send_json(404, {"error": {"message": f"no route {path}"}})
            return
        rec = RecordedRequest(
            route=route, path=path, body=body, headers={k.lower(): v for k, v in self.headers.items()}
        )
        fault, serial = self.fake._record_and_pop_fault(rec)
        with self.fake._serving or contextlib.nullcontext():
            try:  # the prompt cache as it stands when the request is taken up
                usage, pending = self.fake.prompt_cache_lookup(route, body, model)
            except ValueError as err:  # what the provider refuses
                self._send_json(400, _error_body(route, 400, str(err)))
                return
            delay = self.fake.latency_s + (fault.delay_s if fault else 0.0)
            if delay:
                time.sleep(delay)
            if fault is not None and fault.status is not None:
                headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else {}
                self._send_json(fault.status, _error_body(route, fault.status), headers)
                return
            self.fake.prompt_cache_commit(route, pending)  # the answer begins: its writes can be read
            rec.usage = usage
            self._send_json(200, self.fake.answer(route, body, fault, serial, model, usage))


__all__ = ["FakeProviderServer", "Fault", "RecordedRequest"]

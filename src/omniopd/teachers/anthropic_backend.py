"""Anthropic Messages API teacher (official ``anthropic`` SDK), *prefill* protocol.

The partial answer is sent as a final assistant turn and the API returns only its continuation, so the
teacher continues the student's text almost exactly. Trailing whitespace is stripped from the prefill
(the API rejects a final assistant turn ending in whitespace) and accounted for when the continuation is
joined (``protocols.join_continuation``). The Messages API has no ``n``: N samples are N requests, each
with its own sample index in the cache key.

Departures and caveats, as of SDK 2.x / API version ``2026-10-21`` (the version the SDK sends):
* Sampling parameters (``temperature``, ``top_p``) are gone from the SDK and rejected by the API, even
  at their defaults, so the teacher samples at the model's default (temperature 1, the paper's
  setting). ``send_sampling_params=True`` sends them in the body for compatible servers or older API
  versions; otherwise a spec asking for another temperature is logged once and not honoured.
* Prefill is rejected (HTTP 400) by models that do not support it and with extended thinking; such a
  400 fails the request (no retry) and the caller counts the failed chunk. Use a model with prefill.
* No seed: Anthropic sampling is not reproducible; the response cache makes reruns repeatable.
* Prompt caching (``prompt_cache``, on by default): the prefill is cut into text blocks at the chunk
  boundaries of its trajectory, with ``cache_control`` breakpoints where the prefix reaches the model's
  minimum cacheable length, so the N samples of a chunk, later adaptive rounds and later chunks of the same
  trajectory read the earlier prefix from Anthropic's cache (the rules and the shaping:
  ``teachers.prompt_cache``). Usage reports the prompt in three parts (uncached, read, written); the ledger
  prices each at its own rate.

Key from ``ANTHROPIC_API_KEY`` (``api_key_env``); ``base_url`` for a proxy or a compatible server.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any, ClassVar

from omniopd.errors import ConfigError
from omniopd.teachers.base import ContinuationRequest, SamplingSpec
from omniopd.teachers.prices import min_cache_tokens
from omniopd.teachers.prompt_cache import PrefixRegistry, shape_prefill, task_key
from omniopd.teachers.protocols import prefill_messages, prefill_postprocess
from omniopd.teachers.runtime import APITeacher, RawResponse, resolve_api_key

log = logging.getLogger(__name__)


class AnthropicTeacher(APITeacher):
    """Messages API with a prefilled assistant turn.

    Options (all keyword, besides the ``RuntimeOptions`` of ``teachers.runtime``):
      model                 e.g. ``claude-haiku-4-5`` (required)
      base_url              None = api.anthropic.com
      api_key_env           environment variable holding the key [ANTHROPIC_API_KEY]
      privileged            show the reference solution when a request has one [False]
      max_tokens_factor     max_tokens = ceil(C * factor) [1.0]
      send_sampling_params  put temperature/top_p in the body [False: the current API rejects them]
      extra_body            extra JSON fields sent verbatim
    """

    backend: ClassVar[str] = "anthropic-messages"
    protocol: ClassVar[str] = "prefill"

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key_env: str = "ANTHROPIC_API_KEY",
        privileged: bool = False,
        max_tokens_factor: float = 1.0,
        send_sampling_params: bool = False,
        extra_body: dict[str, Any] | None = None,
        **runtime: Any,
    ) -> None:
        super().__init__(model=model, base_url=base_url, privileged=privileged, max_n_per_request=1, **runtime)
        if max_tokens_factor <= 0:
            raise ConfigError(f"max_tokens_factor must be > 0, got {max_tokens_factor}")
        import anthropic

        self.api_key_envs = (api_key_env,)
        self.max_tokens_factor = max_tokens_factor
        self.send_sampling_params = send_sampling_params
        self.extra_body = dict(extra_body or {})
        self.transient_exceptions = (anthropic.APIConnectionError,)  # includes APITimeoutError
        self._warned_sampling = False
        self.cache_min_tokens = self.options.prompt_cache_min_tokens or min_cache_tokens(model, "anthropic")
        self._prefixes = PrefixRegistry()  # the partial answers sent recently: where later ones are cut
        resolve_api_key(self.api_key_envs, base_url, "Anthropic")

    def _create_client(self) -> Any:
        import anthropic

        return anthropic.AsyncAnthropic(
            api_key=resolve_api_key(self.api_key_envs, self.base_url, "Anthropic"),
            base_url=self.base_url,
            max_retries=0,
            timeout=self.sdk_timeout_s(),
        )

    def messages(self, request: ContinuationRequest) -> tuple[list[dict[str, str]], str]:
        """(the ``messages`` as plain strings, the trailing whitespace stripped from the prefill)."""
        return prefill_messages(request, privileged=self.privileged)

    def plan_requests(self, requests: Sequence[ContinuationRequest]) -> None:
        """Register every prefill of the batch before any is sent, so each request is cut at the ends of the
        shorter prefixes of its trajectory, however the batch is ordered or split into rounds."""
        if not self.options.prompt_cache:
            return
        self._prefixes.prune()
        for request in requests:
            messages, _ = self.messages(request)
            if messages[-1]["role"] == "assistant":
                self._prefixes.add(task_key(messages[:-1]), messages[-1]["content"])

    def cached_messages(self, request: ContinuationRequest) -> list[dict[str, Any]]:
        """Exactly the ``messages`` sent: with ``prompt_cache``, the prefill in blocks with breakpoints."""
        messages, _ = self.messages(request)
        if not self.options.prompt_cache:
            return messages
        has_prefill = messages[-1]["role"] == "assistant"
        cuts = self._prefixes.boundaries(task_key(messages[:-1]), messages[-1]["content"]) if has_prefill else []
        return shape_prefill(messages, cuts, self.cache_min_tokens)

    def response_cache_payload(self, payload: dict[str, Any]) -> dict[str, Any]:
        """The payload with every turn as one plain string: the cache blocks depend on which prefixes of the
        task the registry has seen (earlier steps included), not on the request."""
        messages = [
            {
                "role": m["role"],
                "content": m["content"]
                if isinstance(m["content"], str)
                else "".join(block["text"] for block in m["content"]),
            }
            for m in payload["messages"]
        ]
        return {**payload, "messages": messages}

    def build_payload(
        self, request: ContinuationRequest, spec: SamplingSpec, n: int, sample_index: int
    ) -> dict[str, Any]:
        assert n == 1, "the Messages API returns one sample per request"
        payload: dict[str, Any] = {
            "model": self.model,
            "max_tokens": max(1, math.ceil(spec.max_new_tokens * self.max_tokens_factor)),
            "messages": self.cached_messages(request),
        }
        if self.send_sampling_params:
            payload["temperature"] = spec.temperature
            payload["top_p"] = spec.top_p
        elif (spec.temperature != 1.0 or spec.top_p != 1.0) and not self._warned_sampling:
            self._warned_sampling = True
            log.warning(
                "%s samples at the model's default (temperature 1); the requested temperature=%s top_p=%s "
                "is not sent (the Messages API rejects sampling parameters)",
                self.name,
                spec.temperature,
                spec.top_p,
            )
        payload.update(self.extra_body)
        return payload

    async def _send(self, client: Any, payload: dict[str, Any]) -> RawResponse:
        known = {k: payload[k] for k in ("model", "max_tokens", "messages")}
        extra = {k: v for k, v in payload.items() if k not in known}
        msg = await client.messages.create(**known, extra_body=extra or None)
        texts = [block.text for block in (msg.content or []) if getattr(block, "type", None) == "text"]
        usage = msg.usage
        read = int(getattr(usage, "cache_read_input_tokens", 0) or 0)
        written = int(getattr(usage, "cache_creation_input_tokens", 0) or 0)
        return RawResponse(
            texts=["".join(texts)] if texts else [],  # no text block (a refusal): a missing sample
            prompt_tokens=int(getattr(usage, "input_tokens", 0) or 0) + read + written,  # input_tokens: the rest
            completion_tokens=int(getattr(usage, "output_tokens", 0) or 0),
            cached_tokens=read,
            cache_write_tokens=written,
        )

    def postprocess(self, request: ContinuationRequest, text: str) -> str:
        return prefill_postprocess(text, request.prefix)


__all__ = ["AnthropicTeacher"]

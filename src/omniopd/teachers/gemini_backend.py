"""Google Gemini teacher (official ``google-genai`` SDK), *instruct* protocol.

Gemini has no assistant prefill, so the task and the partial answer go in one instruction asking for
the next ~C tokens only (``protocols.instruct_messages``); preambles and echoes are stripped from the
output. Up to ``max_n_per_request`` samples come from one request via ``candidate_count`` (the API
allows up to 8 on models that support it; set 1 for models that do not); the rest are further requests.

Departures and choices:
* Thinking is switched off by default (``thinking_budget=0``): "thinking" models would otherwise spend
  the output allowance on hidden reasoning and the continuation would not be a plain next chunk.
  ``thinking_budget=None`` leaves the model's default; thought tokens are billed and counted as output.
* A candidate with no text (blocked by a safety filter) is a missing sample, topped up, never scored.
* The SDK's retries are off (``HttpRetryOptions(attempts=1)``); ``teachers.runtime`` retries and counts,
  honouring ``Retry-After`` and the ``retryDelay`` Gemini puts in its error details.
* Implicit prompt caching (Gemini 2.5 and newer, above a minimum per model) needs no marker: the instruct
  prompt puts the stable part first (``teachers.prompt_cache``); the cached part of each prompt
  (``cached_content_token_count``) is counted and priced by the ledger.

Key from ``GEMINI_API_KEY`` or ``GOOGLE_API_KEY`` (``api_key_env`` overrides); ``base_url`` and
``api_version`` go to the SDK's ``HttpOptions`` (a proxy or a compatible server).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

from omniopd.errors import ConfigError
from omniopd.teachers.base import ContinuationRequest, SamplingSpec
from omniopd.teachers.protocols import instruct_messages, instruct_postprocess
from omniopd.teachers.runtime import APITeacher, RawResponse, derive_seed, resolve_api_key

GEMINI_MAX_CANDIDATES = 8


class GeminiTeacher(APITeacher):
    """``models.generateContent``, instruct protocol.

    Options (all keyword, besides the ``RuntimeOptions`` of ``teachers.runtime``):
      model                 e.g. ``gemini-2.5-flash`` (required)
      base_url              None = the SDK's default endpoint
      api_version           e.g. "v1beta"; None = the SDK's default
      api_key_env           environment variable holding the key; None = GEMINI_API_KEY, then GOOGLE_API_KEY
      privileged            show the reference solution when a request has one [False]
      max_n_per_request     candidate_count per request [8]; 1 for models without multiple candidates
      send_seed             send a per-request seed [True]
      send_sampling_params  send temperature/top_p [True]
      thinking_budget       0 = no thinking [0]; None = the model's default
      max_tokens_factor     max_output_tokens = ceil(C * factor) [1.5]
    """

    backend: ClassVar[str] = "gemini"
    protocol: ClassVar[str] = "instruct"

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_version: str | None = None,
        api_key_env: str | None = None,
        privileged: bool = False,
        max_n_per_request: int = GEMINI_MAX_CANDIDATES,
        send_seed: bool = True,
        send_sampling_params: bool = True,
        thinking_budget: int | None = 0,
        max_tokens_factor: float = 1.5,
        **runtime: Any,
    ) -> None:
        super().__init__(
            model=model, base_url=base_url, privileged=privileged, max_n_per_request=max_n_per_request, **runtime
        )
        if max_tokens_factor <= 0:
            raise ConfigError(f"max_tokens_factor must be > 0, got {max_tokens_factor}")
        import httpx2
        from google.genai import errors  # noqa: F401 - fail early if the SDK is missing

        self.api_key_envs = (api_key_env,) if api_key_env else ("GEMINI_API_KEY", "GOOGLE_API_KEY")
        self.api_version = api_version
        self.send_seed = send_seed
        self.send_sampling_params = send_sampling_params
        self.thinking_budget = thinking_budget
        self.max_tokens_factor = max_tokens_factor
        self.transient_exceptions = (httpx2.TransportError,)  # connect/read errors and timeouts
        resolve_api_key(self.api_key_envs, base_url, "Gemini")

    def _create_client(self) -> Any:
        from google import genai
        from google.genai import types

        http_options = types.HttpOptions(
            base_url=self.base_url,
            api_version=self.api_version,
            timeout=int(self.sdk_timeout_s() * 1000),  # milliseconds
            retry_options=types.HttpRetryOptions(attempts=1),
        )
        return genai.Client(
            api_key=resolve_api_key(self.api_key_envs, self.base_url, "Gemini"),
            vertexai=False,
            http_options=http_options,
        )

    async def _close_client(self, client: Any) -> None:
        await client.aio.aclose()

    def messages(self, request: ContinuationRequest, spec: SamplingSpec) -> list[dict[str, str]]:
        """The instruction as chat messages (sent as Gemini ``contents``)."""
        return instruct_messages(request, spec.max_new_tokens, privileged=self.privileged)

    def build_payload(
        self, request: ContinuationRequest, spec: SamplingSpec, n: int, sample_index: int
    ) -> dict[str, Any]:
        contents = [
            {"role": "model" if m["role"] == "assistant" else "user", "parts": [{"text": m["content"]}]}
            for m in self.messages(request, spec)
        ]
        config: dict[str, Any] = {
            "candidate_count": n,
            "max_output_tokens": max(1, math.ceil(spec.max_new_tokens * self.max_tokens_factor)),
        }
        if self.send_sampling_params:
            config["temperature"] = spec.temperature
            config["top_p"] = spec.top_p
        if self.send_seed:
            config["seed"] = derive_seed(spec.seed, sample_index)
        if self.thinking_budget is not None:
            config["thinking_config"] = {"thinking_budget": self.thinking_budget}
        return {"model": self.model, "contents": contents, "config": config}

    async def _send(self, client: Any, payload: dict[str, Any]) -> RawResponse:
        resp = await client.aio.models.generate_content(
            model=payload["model"], contents=payload["contents"], config=payload["config"]
        )
        texts: list[str] = []
        for cand in resp.candidates or []:
            parts = (cand.content.parts if cand.content is not None else None) or []
            chunks = [p.text for p in parts if p.text is not None and not p.thought]
            if chunks:
                texts.append("".join(chunks))
        usage = resp.usage_metadata
        out_tokens = int(getattr(usage, "candidates_token_count", 0) or 0) + int(
            getattr(usage, "thoughts_token_count", 0) or 0
        )
        return RawResponse(
            texts=texts,
            prompt_tokens=int(getattr(usage, "prompt_token_count", 0) or 0),
            completion_tokens=out_tokens,
            cached_tokens=int(getattr(usage, "cached_content_token_count", 0) or 0),  # included in prompt_token_count
        )

    def postprocess(self, request: ContinuationRequest, text: str) -> str:
        return instruct_postprocess(text, request.prefix)


__all__ = ["GEMINI_MAX_CANDIDATES", "GeminiTeacher"]

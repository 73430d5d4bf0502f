"""OpenAI-compatible teachers through the official ``openai`` SDK (``AsyncOpenAI``).

``OpenAICompletionsTeacher``  ``/v1/completions`` with the *completion* protocol: the raw prefix (the
    teacher's chat template + the student's partial answer), all N samples in one request with ``n=N``.
    The exact teacher of the paper for any self-hosted model (vLLM, SGLang, llama.cpp, ``transformers
    serve``). A server that returns fewer choices than ``n`` (``transformers serve`` returns one,
    whatever ``n`` says) is topped up with one-sample requests until N; fewer than N is never scored.
``OpenAIChatTeacher``  ``/v1/chat/completions`` with the *instruct* protocol (chat APIs cannot prefill
    the assistant turn), ``n=N`` in one request where the server allows it (``max_n_per_request``), else
    several requests. An approximation of the paper's contract; see ``teachers.protocols``.

Departures from the paper: the paper does not say how it queried its API teachers. Seeds: each request
sends ``seed = derive_seed(spec.seed, first sample index)`` (``send_seed``) so top-ups and repeated
requests are distinct draws and a rerun asks for the same ones; servers treat the seed as best effort.

The API key is read from the environment variable named by ``api_key_env`` (default
``OPENAI_API_KEY``); with a custom ``base_url`` and no key set, a dummy key is sent (local servers).
The SDK's own retries are off; ``teachers.runtime`` retries and counts.

Prompt caching is automatic on OpenAI (prompts of 1,024 tokens or more); both protocols put the stable part
first, so nested prefixes and repeated requests read it (``teachers.prompt_cache``). The cached part of each
prompt (``prompt_tokens_details.cached_tokens``) is counted and priced by the ledger.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

from omniopd.errors import ConfigError
from omniopd.teachers.base import ContinuationRequest, SamplingSpec
from omniopd.teachers.protocols import (
    PLAIN_COMPLETION_STOP,
    completion_postprocess,
    completion_prompt,
    instruct_messages,
    instruct_postprocess,
)
from omniopd.teachers.runtime import APITeacher, RawResponse, derive_seed, resolve_api_key

# body fields the SDK's create() takes as keyword arguments; anything else goes in ``extra_body``
_COMPLETIONS_FIELDS = frozenset({"model", "prompt", "max_tokens", "temperature", "top_p", "n", "seed", "stop"})
_CHAT_FIELDS = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "n",
        "seed",
        "reasoning_effort",
    }
)


def usage_counts(usage: Any) -> dict[str, int]:
    """An OpenAI ``usage`` object as RawResponse counts: ``prompt_tokens`` includes the tokens read from the
    prompt cache (``prompt_tokens_details.cached_tokens``) and those written to it (``cache_write_tokens``,
    reported from the GPT-5.6 family on; absent before, when writes cost nothing extra)."""
    details = getattr(usage, "prompt_tokens_details", None)
    return {
        "prompt_tokens": int(getattr(usage, "prompt_tokens", 0) or 0),
        "completion_tokens": int(getattr(usage, "completion_tokens", 0) or 0),
        "cached_tokens": int(getattr(details, "cached_tokens", 0) or 0),
        "cache_write_tokens": int(getattr(details, "cache_write_tokens", 0) or 0),
    }


def _openai_transient() -> tuple[type[BaseException], ...]:
    import openai

    return (openai.APIConnectionError,)  # includes APITimeoutError


class _OpenAIBase(APITeacher):
    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        privileged: bool = False,
        max_n_per_request: int | None = None,
        send_seed: bool = True,
        max_tokens_factor: float = 1.0,
        extra_body: dict[str, Any] | None = None,
        **runtime: Any,
    ) -> None:
        super().__init__(
            model=model, base_url=base_url, privileged=privileged, max_n_per_request=max_n_per_request, **runtime
        )
        if max_tokens_factor <= 0:
            raise ConfigError(f"max_tokens_factor must be > 0, got {max_tokens_factor}")
        self.api_key_envs = (api_key_env,)
        self.send_seed = send_seed
        self.max_tokens_factor = max_tokens_factor
        self.extra_body = dict(extra_body or {})
        self.transient_exceptions = _openai_transient()
        resolve_api_key(self.api_key_envs, base_url, "OpenAI")  # fail at construction, not mid-run

    def _create_client(self) -> Any:
        import openai

        return openai.AsyncOpenAI(
            api_key=resolve_api_key(self.api_key_envs, self.base_url, "OpenAI"),
            base_url=self.base_url,
            max_retries=0,
            timeout=self.sdk_timeout_s(),
        )

    def _max_tokens(self, spec: SamplingSpec) -> int:
        return max(1, math.ceil(spec.max_new_tokens * self.max_tokens_factor))

    def _split(self, payload: dict[str, Any], fields: frozenset[str]) -> tuple[dict[str, Any], dict[str, Any]]:
        known = {k: v for k, v in payload.items() if k in fields}
        extra = {k: v for k, v in payload.items() if k not in fields}
        return known, extra


class OpenAICompletionsTeacher(_OpenAIBase):
    """``/v1/completions``, completion protocol.

    Options (all keyword, besides the ``RuntimeOptions`` of ``teachers.runtime``):
      model              model name as the server knows it (required)
      base_url           e.g. ``http://127.0.0.1:8000/v1``; None = api.openai.com
      api_key_env        name of the environment variable holding the key [OPENAI_API_KEY]
      tokenizer          the teacher's tokenizer (a name/path for ``omniopd.engine.models.load_tokenizer`` or a
                         tokenizer object) whose chat template wraps the task; None = plain template
      strip_bos          drop the template's BOS when the server's tokenizer adds one itself [True]
      privileged         show the reference solution to the teacher when a request has one [False]
      max_n_per_request  most samples asked in one request (``n``); None = all N at once
      send_seed          send a per-request seed [True]
      stop               stop sequences; None = none with a chat template, ``PLAIN_COMPLETION_STOP`` without
      max_tokens_factor  max_tokens = ceil(C * factor) [1.0]
      extra_body         extra JSON fields sent verbatim (e.g. ``{"top_k": -1}`` for vLLM)
    """

    backend: ClassVar[str] = "openai-completions"
    protocol: ClassVar[str] = "completion"

    def __init__(
        self,
        model: str,
        *,
        tokenizer: Any = None,
        strip_bos: bool = True,
        stop: list[str] | None = None,
        **options: Any,
    ) -> None:
        super().__init__(model, **options)
        if isinstance(tokenizer, str):
            from omniopd.engine.models import load_tokenizer

            tokenizer = load_tokenizer(tokenizer)
        self.template_tokenizer = tokenizer
        self.strip_bos = strip_bos
        has_template = tokenizer is not None and getattr(tokenizer, "chat_template", None) is not None
        self.stop = list(stop) if stop is not None else ([] if has_template else list(PLAIN_COMPLETION_STOP))

    def prompt_text(self, request: ContinuationRequest) -> str:
        """Exactly the ``prompt`` sent for ``request``."""
        return completion_prompt(
            request, privileged=self.privileged, tokenizer=self.template_tokenizer, strip_bos=self.strip_bos
        )

    def build_payload(
        self, request: ContinuationRequest, spec: SamplingSpec, n: int, sample_index: int
    ) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": self.model,
            "prompt": self.prompt_text(request),
            "max_tokens": self._max_tokens(spec),
            "temperature": spec.temperature,
            "top_p": spec.top_p,
            "n": n,
        }
        if self.send_seed:
            payload["seed"] = derive_seed(spec.seed, sample_index)
        if self.stop:
            payload["stop"] = list(self.stop)
        payload.update(self.extra_body)
        return payload

    async def _send(self, client: Any, payload: dict[str, Any]) -> RawResponse:
        known, extra = self._split(payload, _COMPLETIONS_FIELDS)
        resp = await client.completions.create(**known, extra_body=extra or None)
        choices = sorted(resp.choices or [], key=lambda c: c.index)
        return RawResponse(texts=[c.text for c in choices if c.text is not None], **usage_counts(resp.usage))

    def postprocess(self, request: ContinuationRequest, text: str) -> str:
        return completion_postprocess(text)


class OpenAIChatTeacher(_OpenAIBase):
    """``/v1/chat/completions``, instruct protocol.

    Options (besides ``RuntimeOptions``): ``model``, ``base_url``, ``api_key_env``, ``privileged``,
    ``max_n_per_request``, ``send_seed``, ``extra_body`` as for :class:`OpenAICompletionsTeacher`, and
      max_tokens_factor     output allowance = ceil(C * factor): room for a preamble that is stripped [1.5]
      max_tokens_field      "max_completion_tokens" (OpenAI) or "max_tokens" (older servers)
      send_sampling_params  send temperature/top_p [True]; False for models that reject them
      reasoning_effort      passed through when set (reasoning models spend output tokens thinking)
    """

    backend: ClassVar[str] = "openai-chat"
    protocol: ClassVar[str] = "instruct"

    def __init__(
        self,
        model: str,
        *,
        max_tokens_factor: float = 1.5,
        max_tokens_field: Literal["max_completion_tokens", "max_tokens"] = "max_completion_tokens",
        send_sampling_params: bool = True,
        reasoning_effort: str | None = None,
        **options: Any,
    ) -> None:
        super().__init__(model, max_tokens_factor=max_tokens_factor, **options)
        if max_tokens_field not in ("max_completion_tokens", "max_tokens"):
            raise ConfigError(f"max_tokens_field must be max_completion_tokens or max_tokens, got {max_tokens_field!r}")
        self.max_tokens_field = max_tokens_field
        self.send_sampling_params = send_sampling_params
        self.reasoning_effort = reasoning_effort

    def messages(self, request: ContinuationRequest, spec: SamplingSpec) -> list[dict[str, str]]:
        """Exactly the ``messages`` sent for ``request``."""
        return instruct_messages(request, spec.max_new_tokens, privileged=self.privileged)

    def build_payload(
        self, request: ContinuationRequest, spec: SamplingSpec, n: int, sample_index: int
    ) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": self.model,
            "messages": self.messages(request, spec),
            self.max_tokens_field: self._max_tokens(spec),
            "n": n,
        }
        if self.send_sampling_params:
            payload["temperature"] = spec.temperature
            payload["top_p"] = spec.top_p
        if self.send_seed:
            payload["seed"] = derive_seed(spec.seed, sample_index)
        if self.reasoning_effort is not None:
            payload["reasoning_effort"] = self.reasoning_effort
        payload.update(self.extra_body)
        return payload

    async def _send(self, client: Any, payload: dict[str, Any]) -> RawResponse:
        known, extra = self._split(payload, _CHAT_FIELDS)
        resp = await client.chat.completions.create(**known, extra_body=extra or None)
        choices = sorted(resp.choices or [], key=lambda c: c.index)
        return RawResponse(
            # a refusal or an empty message (content None) is a missing sample, topped up, never scored
            texts=[c.message.content for c in choices if c.message is not None and c.message.content is not None],
            **usage_counts(resp.usage),
        )

    def postprocess(self, request: ContinuationRequest, text: str) -> str:
        return instruct_postprocess(text, request.prefix)


__all__ = ["OpenAIChatTeacher", "OpenAICompletionsTeacher", "usage_counts"]

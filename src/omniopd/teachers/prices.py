"""List prices and prompt-cache minimums of a few known API models, the defaults of the teacher's price options.

USD per million tokens, as the providers' pricing pages listed them when this table was written (Anthropic:
platform.claude.com/docs/en/about-claude/pricing; OpenAI: developers.openai.com/api/docs/models; Google:
ai.google.dev/gemini-api/docs/pricing). Prices change: every figure is a default that a recipe overrides with
``teacher.price_input_per_mtok``, ``teacher.price_output_per_mtok``, ``teacher.price_cached_input_per_mtok``,
``teacher.price_cache_write_per_mtok`` (and ``teacher.prompt_cache_min_tokens`` for the minimum).

A model not in the table gets no input/output price (0: no cost estimate, and ``max_cost_usd`` refuses to run
without one), and cached/written tokens priced from its input price by the provider's published multipliers
where they are the same for every model (Anthropic: reads 0.1x, 5-minute writes 1.25x) and at the full input
price where they are not (OpenAI, Gemini: an unknown model's discount is not assumed, so the ledger errs high).
The provider rules these numbers come from are in :mod:`omniopd.teachers.prompt_cache`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Provider = Literal["anthropic", "openai", "gemini"]

#: the provider whose pricing and cache rules each API backend follows
PROVIDER_OF_BACKEND: dict[str, Provider] = {
    "anthropic-messages": "anthropic",
    "openai-completions": "openai",
    "openai-chat": "openai",
    "gemini": "gemini",
}
#: minimum cacheable prompt for a model not in the table: the most common documented figure per provider
DEFAULT_MIN_CACHE_TOKENS: dict[Provider, int] = {"anthropic": 1024, "openai": 1024, "gemini": 2048}
#: cached-read and cache-write price as a multiple of the input price, for a model not in the table
DEFAULT_MULTIPLIERS: dict[Provider, tuple[float, float]] = {
    "anthropic": (0.1, 1.25),
    "openai": (1.0, 1.0),
    "gemini": (1.0, 1.0),
}


@dataclass(frozen=True)
class ModelPrice:
    """One model's list prices (USD per million tokens) and the shortest prompt prefix its provider caches."""

    input: float  # uncached prompt tokens
    output: float  # generated tokens (thinking included)
    cached_input: float  # prompt tokens read from the provider's cache
    cache_write: float  # prompt tokens written to it (Anthropic's 5-minute TTL; OpenAI/Gemini implicit: = input)
    min_cache_tokens: int  # a shorter prefix is never cached, marked or not


KNOWN_MODELS: dict[str, ModelPrice] = {
    # Anthropic: cache reads 0.1x input, 5-minute cache writes 1.25x input, for every model
    "claude-haiku-4-5": ModelPrice(1.00, 5.00, 0.10, 1.25, 4096),
    "claude-sonnet-4-5": ModelPrice(3.00, 15.00, 0.30, 3.75, 1024),
    "claude-opus-4-5": ModelPrice(5.00, 25.00, 0.50, 6.25, 4096),
    # OpenAI: automatic caching from 1,024 tokens; writes at the input price before the GPT-5.6 family
    "gpt-5-mini": ModelPrice(0.25, 2.00, 0.025, 0.25, 1024),
    "gpt-4.1": ModelPrice(2.00, 8.00, 0.50, 2.00, 1024),
    # Gemini: implicit caching on 2.5 and newer, cached tokens at 10% of the input price, no write charge
    "gemini-2.5-flash": ModelPrice(0.30, 2.50, 0.03, 0.30, 2048),
}


def known_model(model: str) -> ModelPrice | None:
    """The table's entry for ``model``, or for the model a dated snapshot name belongs to
    (``claude-haiku-4-5-20251001`` -> ``claude-haiku-4-5``); ``models/`` prefixes are ignored."""
    name = model.removeprefix("models/")
    if name in KNOWN_MODELS:
        return KNOWN_MODELS[name]
    matches = [k for k in KNOWN_MODELS if name.startswith(k + "-")]
    return KNOWN_MODELS[max(matches, key=len)] if matches else None


@dataclass(frozen=True)
class Prices:
    """The prices a ledger bills with (USD per million tokens)."""

    input: float = 0.0
    output: float = 0.0
    cached_input: float = 0.0
    cache_write: float = 0.0

    @property
    def known(self) -> bool:
        """Whether anything is priced at all (a cost cap needs it)."""
        return self.input > 0 or self.output > 0 or self.cached_input > 0 or self.cache_write > 0

    def cost_usd(
        self,
        prompt_tokens: float,
        completion_tokens: float,
        cached_tokens: float = 0.0,
        cache_write_tokens: float = 0.0,
    ) -> float:
        """Dollars for ``prompt_tokens`` in total, of which ``cached_tokens`` were read from the cache and
        ``cache_write_tokens`` written to it (each prompt token is billed at exactly one of the three rates)."""
        uncached = prompt_tokens - cached_tokens - cache_write_tokens
        return (
            uncached * self.input
            + cached_tokens * self.cached_input
            + cache_write_tokens * self.cache_write
            + completion_tokens * self.output
        ) / 1e6


def resolve_prices(
    model: str,
    provider: Provider,
    *,
    input: float | None = None,
    output: float | None = None,
    cached_input: float | None = None,
    cache_write: float | None = None,
) -> Prices:
    """Explicit prices win. Otherwise input/output come from the table (0 for an unknown model), and the cached
    and write prices from the input price by the table's ratios (a known model) or the provider's multipliers
    (``DEFAULT_MULTIPLIERS``)."""
    entry = known_model(model)
    p_in = input if input is not None else (entry.input if entry else 0.0)
    p_out = output if output is not None else (entry.output if entry else 0.0)
    if entry is not None:  # the table's own ratios (its cache prices scale with an overridden input price)
        read_x, write_x = entry.cached_input / entry.input, entry.cache_write / entry.input
    else:
        read_x, write_x = DEFAULT_MULTIPLIERS[provider]
    default_read, default_write = p_in * read_x, p_in * write_x
    return Prices(
        input=p_in,
        output=p_out,
        cached_input=cached_input if cached_input is not None else default_read,
        cache_write=cache_write if cache_write is not None else default_write,
    )


def min_cache_tokens(model: str, provider: Provider) -> int:
    """The shortest prompt prefix ``provider`` caches for ``model``."""
    entry = known_model(model)
    return entry.min_cache_tokens if entry is not None else DEFAULT_MIN_CACHE_TOKENS[provider]


__all__ = [
    "DEFAULT_MIN_CACHE_TOKENS",
    "DEFAULT_MULTIPLIERS",
    "KNOWN_MODELS",
    "PROVIDER_OF_BACKEND",
    "ModelPrice",
    "Prices",
    "Provider",
    "known_model",
    "min_cache_tokens",
    "resolve_prices",
]

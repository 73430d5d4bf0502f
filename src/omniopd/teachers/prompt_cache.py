"""Provider prompt caching: the documented rules, the requests shaped for them, and a model of each cache.

OmniOPD's requests are unusually repetitive: the N samples of a chunk send the same prompt (N requests on the
Messages API, which has no ``n``), adaptive N re-sends it in later rounds, and the M chunks of a trajectory
send nested prefixes of one answer in ascending order. Providers bill prompt tokens read from their cache at a
fraction of the input price. The rules differ by provider and by model; what their documentation said when
this module was written (sources in brackets; figures per model are in :mod:`omniopd.teachers.prices`):

Anthropic, Messages API: explicit caching. [platform.claude.com/docs/en/build-with-claude/prompt-caching;
platform.claude.com/docs/en/about-claude/pricing]
  * ``cache_control: {"type": "ephemeral"}`` on a content block caches the whole prompt up to and including
    that block (tools, system, messages, in that order); a hit needs an exact prefix match.
  * At most 4 breakpoints per request. A breakpoint finds an earlier entry at any block boundary up to 20
    blocks before it, so an entry written at the end of a shorter prefix is read by a longer one.
  * A prefix shorter than the model's minimum is processed without caching (no error): 1,024 tokens for
    Sonnet 4.5, Sonnet 4, Opus 4.1/4; 2,048 for Haiku 3.5/3 and Sonnet 4.6; 4,096 for Haiku 4.5 and Opus
    4.5/4.6 (later models list 512-2,048).
  * Entries live 5 minutes, refreshed on every read (a 1-hour TTL costs 2x to write). An entry is usable once
    the first response that writes it begins: requests sent together all write.
  * Reads cost 0.1x the input price, 5-minute writes 1.25x. ``usage.input_tokens`` counts only the tokens
    after the last cache hit or write; ``cache_read_input_tokens`` and ``cache_creation_input_tokens`` the rest.
  * A prefilled final assistant turn must not end in whitespace, and text blocks must not be empty.
OpenAI: automatic caching. [developers.openai.com/api/docs/guides/prompt-caching; the Prompt Caching 201
cookbook]
  * On for prompts of 1,024 tokens or more, exact prefix match, hits in increments of 128 tokens; requests
    are routed by a hash of about the first 256 tokens (``prompt_cache_key`` refines it).
  * ``usage.prompt_tokens_details.cached_tokens`` (included in ``prompt_tokens``); the cached-input price
    depends on the model (0.1x for the GPT-5 family, 0.25-0.5x for GPT-4.1/4o). Writes are free before the
    GPT-5.6 family; from it, writes cost 1.25x and are reported in ``cache_write_tokens``.
Gemini: implicit caching. [ai.google.dev/gemini-api/docs/caching; cloud.google.com Vertex AI context-cache
overview]
  * On by default for Gemini 2.5 and newer, above a minimum per model (2,048 tokens for 2.5 Flash/Pro in the
    current page, 1,024 in an earlier revision; 4,096 for Gemini 3.x). Large common content first, similar
    prefixes sent close in time.
  * ``usage_metadata.cached_content_token_count`` (included in ``prompt_token_count``); a 90% discount on
    2.5 and newer (75% on 2.0), no write or storage charge for implicit hits.

How the requests are shaped (``teacher.prompt_cache``, on by default):
  * Anthropic: the prefill is split into text blocks at chunk boundaries, the ends of the shorter partial
    answers of the same task sent recently (:class:`PrefixRegistry`; the ends of the *stripped* prefixes, so
    the block a shorter request ended with is byte-identical in the longer one, whose stripped whitespace
    opens its next block, and no block is empty or ends the turn in whitespace). Breakpoints go on the last
    block and the latest earlier block ends whose prefix reaches the model's minimum (4 at most,
    :func:`shape_prefill`): the first of a chunk's N requests writes the prompt, the other N-1 and any later
    adaptive round read it, and a later chunk of the trajectory reads the earlier chunk's entry and writes
    only its own new text. A request with no boundary at or above the minimum is sent unchanged (plain
    strings). With ``teacher.dispatch=warm_first`` the shortest prefix of each trajectory is written before
    the others go out together; ``sequential`` also lets each chunk read the previous one (less written,
    less parallel). Switched off, no request carries a breakpoint and nothing is cached.
  * OpenAI and Gemini cache on their own: the completion and instruct protocols already put the stable part
    first (template, task, partial answer; the length request after it), so nested prefixes share all but
    the tail, and N samples asked in one request (``n``, ``candidate_count``) send the prompt once. No
    ``prompt_cache_key`` is sent (self-hosted servers may refuse unknown fields; ``teacher.extra_body`` can
    add one). A client cannot switch their automatic caching off, so ``teacher.prompt_cache=false`` is refused there.

The models below (:class:`BreakpointCache`, :class:`PrefixCache`) implement these rules for the local fake
providers and for ``omniopd estimate``, with tokens approximated as 4 characters each (:func:`approx_tokens`,
the providers' rule of thumb for English), so both count the same way.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

MAX_BREAKPOINTS = 4  # Anthropic: cache_control blocks per request
LOOKBACK_BLOCKS = 20  # Anthropic: block boundaries a breakpoint searches for an earlier entry
CACHE_TTL_S = 300.0  # Anthropic's default TTL; OpenAI and Gemini keep implicit entries minutes too
OPENAI_INCREMENT = 128  # OpenAI: cached tokens grow in steps of 128 past the minimum
EPHEMERAL = {"type": "ephemeral"}


def approx_tokens(text: str) -> int:
    """Tokens of ``text`` at 4 characters each (rounded up)."""
    return math.ceil(len(text) / 4)


# --------------------------------------------------------------------------------------------------
# request shaping (Anthropic)
# --------------------------------------------------------------------------------------------------


class PrefixRegistry:
    """The stripped partial answers sent recently, per task: where a longer answer of the same task is cut into
    blocks. Entries unused for ``ttl_s`` are dropped (the provider's cache has expired by then)."""

    def __init__(self, ttl_s: float = 2 * CACHE_TTL_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s, self._clock = ttl_s, clock
        self._bodies: dict[str, dict[str, float]] = {}  # task -> body -> last time it was sent

    def add(self, task: str, body: str) -> None:
        if body:
            self._bodies.setdefault(task, {})[body] = self._clock()

    def prune(self) -> None:
        cutoff = self._clock() - self.ttl_s
        for task in list(self._bodies):
            bodies = {b: t for b, t in self._bodies[task].items() if t >= cutoff}
            if bodies:
                self._bodies[task] = bodies
            else:
                del self._bodies[task]

    def boundaries(self, task: str, body: str) -> list[int]:
        """Ends of the registered bodies of ``task`` that are proper prefixes of ``body``, ascending."""
        return sorted({len(q) for q in self._bodies.get(task, ()) if 0 < len(q) < len(body) and body.startswith(q)})

    def __len__(self) -> int:
        return sum(len(b) for b in self._bodies.values())


def task_key(messages: Sequence[dict[str, Any]]) -> str:
    """What identifies the task part of a prefill request: every turn before the prefilled answer."""
    return "\x1e".join(f"{m['role']}\x1f{m['content']}" for m in messages)


def shape_prefill(
    messages: list[dict[str, str]], boundaries: Sequence[int], min_tokens: int, max_breakpoints: int = MAX_BREAKPOINTS
) -> list[dict[str, Any]]:
    """``messages`` (plain-string turns, the last one possibly the prefilled assistant answer) with the answer
    cut into text blocks at ``boundaries`` (character offsets into it) and ``cache_control`` on the last
    ``max_breakpoints`` block ends whose prefix reaches ``min_tokens`` (approximate tokens). Returned unchanged
    when no block end reaches the minimum: a breakpoint there would cache nothing."""
    pieces: list[tuple[int, str]] = []  # (message index, block text)
    for i, m in enumerate(messages):
        text = m["content"]
        if i == len(messages) - 1 and m["role"] == "assistant":
            cuts = [0, *sorted({b for b in boundaries if 0 < b < len(text)}), len(text)]
            pieces += [(i, text[a:b]) for a, b in zip(cuts, cuts[1:])]
        else:
            pieces.append((i, text))
    total, eligible = 0, []
    for k, (_, text) in enumerate(pieces):
        total += approx_tokens(text)
        if total >= min_tokens:
            eligible.append(k)
    if not eligible:
        return messages
    marks = set(eligible[-max_breakpoints:])
    out: list[dict[str, Any]] = [{"role": m["role"], "content": []} for m in messages]
    for k, (i, text) in enumerate(pieces):
        out[i]["content"].append({"type": "text", "text": text, **({"cache_control": EPHEMERAL} if k in marks else {})})
    return out


# --------------------------------------------------------------------------------------------------
# what a request's prompt is, per provider
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    role: str
    text: str
    breakpoint: bool = False


def message_blocks(body: dict[str, Any]) -> list[Block]:
    """The text blocks of an Anthropic Messages request in cache order (system, then messages). Raises
    ``ValueError`` with the API's complaint for what it rejects: more than 4 breakpoints, an empty or
    whitespace-only text block, a final assistant turn ending in whitespace, a block that is not text."""

    def blocks_of(role: str, content: Any) -> list[Block]:
        if isinstance(content, str):
            items = [{"type": "text", "text": content}]
        else:
            items = list(content or [])
        out = []
        for item in items:
            if item.get("type") != "text":
                raise ValueError(f"only text content blocks are supported here, got {item.get('type')!r}")
            text = item.get("text") or ""
            if not text.strip():
                raise ValueError("messages: text content blocks must contain non-whitespace text")
            out.append(Block(role, text, item.get("cache_control") is not None))
        return out

    blocks = blocks_of("system", body["system"]) if body.get("system") else []
    messages = body.get("messages") or []
    for m in messages:
        blocks += blocks_of(m["role"], m["content"])
    if messages and messages[-1]["role"] == "assistant" and blocks and blocks[-1].text != blocks[-1].text.rstrip():
        raise ValueError("messages: final assistant content cannot end with trailing whitespace")
    marks = sum(b.breakpoint for b in blocks)
    if marks > MAX_BREAKPOINTS:
        raise ValueError(f"A maximum of {MAX_BREAKPOINTS} blocks with cache_control may be provided. Found {marks}.")
    return blocks


def chat_prompt_text(messages: Sequence[dict[str, Any]]) -> str:
    """An OpenAI chat request's prompt as one string, turn by turn (what its prefix cache sees)."""
    return "".join(
        f"<|{m['role']}|>{m['content'] if isinstance(m['content'], str) else m['content']!r}" for m in messages
    )


def gemini_prompt_text(contents: Sequence[dict[str, Any]]) -> str:
    """A Gemini ``contents`` list as one string, turn by turn."""
    return "".join(
        f"<|{c.get('role', 'user')}|>" + "".join(p.get("text") or "" for p in c.get("parts") or []) for c in contents
    )


# --------------------------------------------------------------------------------------------------
# the caches
# --------------------------------------------------------------------------------------------------


@dataclass
class CacheUsage:
    """One request's prompt tokens: in total, read from the cache, written to it (the rest billed in full)."""

    prompt_tokens: int
    cached_tokens: int = 0
    cache_write_tokens: int = 0

    @property
    def uncached_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens - self.cache_write_tokens


MinTokens = Callable[[str], int]  # model name -> the shortest prefix cached for it


class BreakpointCache:
    """Anthropic's explicit cache. :meth:`lookup` is called when a request arrives (reads, and refreshes what it
    reads); :meth:`commit` with what it returned once the answer begins (writes become visible)."""

    def __init__(
        self,
        min_tokens: MinTokens,
        ttl_s: float = CACHE_TTL_S,
        clock: Callable[[], float] = time.monotonic,
        lookback: int = LOOKBACK_BLOCKS,
    ) -> None:
        self.min_tokens, self.ttl_s, self._clock, self.lookback = min_tokens, ttl_s, clock, lookback
        self._entries: dict[str, float] = {}  # prefix hash -> expiry
        self._lock = threading.Lock()

    def lookup(self, model: str, blocks: Sequence[Block]) -> tuple[CacheUsage, list[str]]:
        cum, keys, total = [], [], 0
        h = hashlib.sha256(model.encode())
        for b in blocks:
            total += approx_tokens(b.text)
            cum.append(total)
            h.update(f"\x1e{b.role}\x1f{b.text}".encode())
            keys.append(h.hexdigest())
        marks = [i for i, b in enumerate(blocks) if b.breakpoint]
        minimum = self.min_tokens(model)
        with self._lock:
            now = self._clock()
            hit = -1
            for m in marks:
                for i in range(m, max(-1, m - self.lookback), -1):
                    if i <= hit:
                        break
                    if self._entries.get(keys[i], 0.0) > now:
                        hit = i
                        break
            if hit >= 0:
                self._entries[keys[hit]] = now + self.ttl_s  # a read refreshes the entry
        writes = [m for m in marks if cum[m] >= minimum]
        read = cum[hit] if hit >= 0 else 0
        new = [m for m in writes if m > hit]
        written = cum[max(new)] - read if new else 0
        return CacheUsage(total, read, written), [keys[m] for m in writes]

    def commit(self, pending: Sequence[str]) -> None:
        with self._lock:
            now = self._clock()
            for key in pending:
                self._entries[key] = now + self.ttl_s
            if len(self._entries) > 50_000:
                self._entries = {k: t for k, t in self._entries.items() if t > now}

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


class PrefixCache:
    """OpenAI's and Gemini's automatic caches: every prompt of at least the minimum is stored; a later prompt
    reads the longest prefix it shares with a stored one, counted from the minimum in steps of ``increment``."""

    def __init__(
        self,
        min_tokens: MinTokens,
        increment: int = 1,
        ttl_s: float = CACHE_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.min_tokens, self.increment, self.ttl_s, self._clock = min_tokens, increment, ttl_s, clock
        self._prompts: dict[tuple[str, str], dict[str, float]] = {}  # (model, first min tokens) -> prompt -> expiry
        self._lock = threading.Lock()

    @staticmethod
    def _common(a: str, b: str) -> int:
        lo, hi = 0, min(len(a), len(b))
        while lo < hi:  # binary search on slices: the comparisons run in C
            mid = (lo + hi + 1) // 2
            if a[:mid] == b[:mid]:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def lookup(self, model: str, text: str) -> tuple[CacheUsage, list[tuple[str, str, str]]]:
        total, minimum = approx_tokens(text), self.min_tokens(model)
        if total < minimum:
            return CacheUsage(total), []
        route = (model, text[: 4 * minimum])  # a prompt sharing fewer than `minimum` tokens cannot hit
        best = 0
        with self._lock:
            now = self._clock()
            stored = self._prompts.get(route, {})
            for prompt, expiry in list(stored.items()):
                if expiry <= now:
                    del stored[prompt]
                    continue
                common = self._common(prompt, text)
                if common > best:
                    best, hit = common, prompt
            if best:
                stored[hit] = now + self.ttl_s
        shared = min(best // 4, total)
        cached = minimum + (shared - minimum) // self.increment * self.increment if shared >= minimum else 0
        return CacheUsage(total, cached), [(model, text[: 4 * minimum], text)]

    def commit(self, pending: Sequence[tuple[str, str, str]]) -> None:
        with self._lock:
            now = self._clock()
            for model, head, text in pending:
                self._prompts.setdefault((model, head), {})[text] = now + self.ttl_s

    def clear(self) -> None:
        with self._lock:
            self._prompts.clear()


__all__ = [
    "CACHE_TTL_S",
    "EPHEMERAL",
    "LOOKBACK_BLOCKS",
    "MAX_BREAKPOINTS",
    "OPENAI_INCREMENT",
    "Block",
    "BreakpointCache",
    "CacheUsage",
    "PrefixCache",
    "PrefixRegistry",
    "approx_tokens",
    "chat_prompt_text",
    "gemini_prompt_text",
    "message_blocks",
    "shape_prefill",
    "task_key",
]

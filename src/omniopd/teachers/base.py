"""The teacher contract: "continue this text prefix for about C tokens, N samples, temperature T".

A teacher never returns logits. It gets the task (the student's question, and for a privileged
teacher the reference solution) and the student's partial answer as *text*, and returns N sampled
continuations as text. Each backend decides how to honour the contract (raw completion, chat with a
prefilled assistant turn, an instruction); the audit cuts and scores the text the same way for all.

A result holds exactly ``n`` texts or an ``error``. A short result is never scored as if complete:
the audit drops that chunk and counts it (``teacher/failed_chunks``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class ContinuationRequest:
    question: str  # the task as the student saw it (before the chat template)
    prefix: str  # the student's partial answer y_<t, decoded text; the teacher continues it
    reference: str | None = None  # privileged information; only privileged teachers use it
    trajectory: int = 0  # requests with the same trajectory have nested prefixes
    instruction: str | None = None  # the answer-format instruction after the question; None: math default


@dataclass(frozen=True)
class SamplingSpec:
    n: int  # N continuations per request
    max_new_tokens: int  # in the teacher's own tokens
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0


@dataclass
class ContinuationResult:
    texts: list[str] = field(default_factory=list)  # exactly SamplingSpec.n on success
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class Teacher(ABC):
    """Text in, text out. ``name`` is recorded with every audit so runs can be compared."""

    name: str
    tokenizer: PreTrainedTokenizerBase | None = None  # set by local backends that can count tokens; None for APIs

    @abstractmethod
    def continue_prefixes(self, requests: list[ContinuationRequest], spec: SamplingSpec) -> list[ContinuationResult]:
        """One result per request, in order."""

    def metrics(self) -> dict[str, float]:
        """Cumulative backend counters (requests, retries, cost, ...); empty for in-process teachers."""
        return {}

    def close(self) -> None:  # noqa: B027 - optional hook
        pass

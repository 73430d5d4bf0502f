"""One generated answer, as every generator (HF, llama.cpp, an API teacher) returns it to the evaluation runner."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Sample:
    text: str
    tokens: int  # generated tokens (0 when unknown, e.g. API without usage)
    finished: bool  # ended by the model, not by the length limit

"""The base of every config section (frozen; an unknown key is refused with one line)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A config section: frozen, unknown keys refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)

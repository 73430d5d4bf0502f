"""User-facing errors.

Anything a user can cause (a bad config value, a malformed data row, a missing model path, a teacher
that cannot deliver) raises :class:`OmniOPDError`. The CLI turns it into one line on stderr and exit
status 2, never a traceback. Internal invariants (a target outside [0, 1]) stay plain assertions or
``RuntimeError``: those are bugs, not input problems.
"""

from __future__ import annotations


class OmniOPDError(Exception):
    """An error caused by user input; printed as one line, exit status 2."""


class ConfigError(OmniOPDError):
    """A config value is missing, unknown or out of range."""


class DataError(OmniOPDError):
    """A dataset file is missing or a row is malformed (the message names file and line)."""


class ModelError(OmniOPDError):
    """A model path or name cannot be resolved or loaded."""


class TeacherError(OmniOPDError):
    """The teacher cannot deliver what the run needs (too many failed chunks, budget reached)."""

"""Checks before spending compute: preflight of a teacher (``check-teacher``), the signal check
(``check-signal``), and what an API teacher will bill (``estimate``)."""

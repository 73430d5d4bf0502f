"""Reading a run's metrics.jsonl: rows with their steps, series and aligned columns."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

# --------------------------------------------------------------------------------------------- reading


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    f = float(value)
    return f if math.isfinite(f) else None


def _read_jsonl(path: Path) -> tuple[list[dict], int]:
    """Rows that are JSON objects, and the number of non-blank lines that were not."""
    rows: list[dict] = []
    bad = 0
    with path.open(encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (ValueError, RecursionError):
                bad += 1
                continue
            if isinstance(row, dict):
                rows.append(row)
            else:
                bad += 1
    return rows, bad


def _with_steps(rows: list[dict]) -> list[tuple[int, dict]]:
    """(step, row); a row without a usable step takes the last step seen (an eval row after a step)."""
    out: list[tuple[int, dict]] = []
    last = 0
    for row in rows:
        s = _finite(row.get("step"))
        if s is not None:
            last = int(s)
        out.append((last, row))
    return out


def _series(rows: list[tuple[int, dict]], key: str) -> tuple[list[int], list[float]]:
    xs: list[int] = []
    ys: list[float] = []
    for step, row in rows:
        v = _finite(row.get(key))
        if v is not None:
            xs.append(step)
            ys.append(v)
    return xs, ys


def _aligned(rows: list[tuple[int, dict]], keys: list[str]) -> tuple[list[int], list[list[float]]]:
    """Steps at which every key is present, and the values of each key there."""
    xs: list[int] = []
    cols: list[list[float]] = [[] for _ in keys]
    for step, row in rows:
        vals = [_finite(row.get(k)) for k in keys]
        if all(v is not None for v in vals):
            xs.append(step)
            for col, v in zip(cols, vals):
                col.append(v)  # type: ignore[arg-type]
    return xs, cols


def _cumulative(xs: list[int], ys: list[float]) -> tuple[list[int], list[float]]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    total = 0.0
    cx, cy = [], []
    for i in order:
        total += ys[i]
        cx.append(xs[i])
        cy.append(total)
    return cx, cy

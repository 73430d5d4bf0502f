"""Audit records prepared for the viewer: chunk spans located in the response, segments, subsampling."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from omniopd.report.metrics import _finite, _read_jsonl

MAX_AUDIT_RECORDS = 1000  # above this many records, or MAX_AUDIT_BYTES of audit JSON, whole steps are
MAX_AUDIT_BYTES = 12_000_000  # subsampled evenly (first and last kept) and the page says so
_CONTEXT_CHARS = 160  # response text shown before a chunk in the panel (what the teacher's prefix ends with)


# --------------------------------------------------------------------------------------------- audits


def _clean(value: Any) -> Any:
    """JSON-safe copy: non-finite floats become null (JSON.parse rejects NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ("" if value is None else str(value))


def _list(value: Any) -> list:
    return value if isinstance(value, list) else []


def _int_or(value: Any, default: int) -> int:
    f = _finite(value)
    return int(f) if f is not None else default


def _locate(response: str, chunk: dict) -> tuple[int, int] | None:
    """Code-point span of a chunk inside the response, or None when it cannot be found."""
    n = len(response)
    text = _text(chunk.get("student_text"))
    cs = min(max(_int_or(chunk.get("char_start"), 0), 0), n)
    ce = min(max(_int_or(chunk.get("char_end"), cs + len(text)), cs), n)
    if text and response[cs:ce] == text:
        return cs, ce
    for needle in (text, text.strip()):
        if not needle:
            continue
        best = None
        pos = response.find(needle)
        while pos != -1:
            if best is None or abs(pos - cs) < abs(best - cs):
                best = pos
            pos = response.find(needle, pos + 1)
        if best is not None:
            return best, best + len(needle)
    if not text and ce > cs:
        return cs, ce
    return None


def _segments(response: str, spans: list[tuple[int, int, int]]) -> tuple[list[list], set[int]]:
    """Split the response into [text, chunk index | -1]; overlapping spans are trimmed, empty ones dropped."""
    segs: list[list] = []
    placed: set[int] = set()
    cursor = 0
    for start, end, idx in sorted(spans):
        start = max(start, cursor)
        if start >= end:
            continue
        if start > cursor:
            segs.append([response[cursor:start], -1])
        segs.append([response[start:end], idx])
        placed.add(idx)
        cursor = end
    if cursor < len(response) or not segs:
        segs.append([response[cursor:], -1])
    return segs, placed


def _prepare_record(rec: dict) -> dict:
    response = _text(rec.get("response"))
    raw_chunks = _list(rec.get("chunks"))
    chunks: list[dict] = []
    spans: list[tuple[int, int, int]] = []
    for i, ch in enumerate(c for c in raw_chunks if isinstance(c, dict)):
        conts = _list(ch.get("continuations"))
        phis = _list(ch.get("phi_scores"))
        span = _locate(response, ch)
        if span is not None:
            spans.append((span[0], span[1], i))
        chunks.append(
            {
                "start": _finite(ch.get("start")),
                "end": _finite(ch.get("end")),
                "entropy": _finite(ch.get("entropy")),
                "k_sem": _finite(ch.get("k_sem")),
                "prior_mean": _finite(ch.get("prior_mean")),
                "target": _finite(ch.get("target")),
                "student_text": _text(ch.get("student_text")),
                "continuations": [_text(c) for c in conts],
                "phi_scores": [_finite(p) for p in phis],
                "context": response[max(0, span[0] - _CONTEXT_CHARS) : span[0]] if span else "",
            }
        )
    segs, placed = _segments(response, spans)
    for i, ch in enumerate(chunks):
        ch["placed"] = i in placed
    return {
        "step": _int_or(rec.get("step"), 0),
        "trajectory": _int_or(rec.get("trajectory"), 0),
        "example_id": _text(rec.get("example_id")),
        "prompt": _text(rec.get("prompt")),
        "response_tokens": _finite(rec.get("response_tokens")),
        "selector": _text(rec.get("selector")),
        "phi": _text(rec.get("phi")),
        "teacher": _text(rec.get("teacher")),
        "segments": segs,
        "chunks": chunks,
    }


def _subsample(records: list[dict], max_records: int, max_bytes: int) -> tuple[list[dict], str | None]:
    """Keep whole steps, evenly spaced (first and last kept), so the page stays light enough to open."""
    sizes = [len(json.dumps(_clean(r), ensure_ascii=False)) for r in records]
    total = sum(sizes)
    if len(records) <= max_records and total <= max_bytes:
        return records, None
    steps = sorted({r["step"] for r in records})
    per_step_n = len(records) / len(steps)
    per_step_b = total / len(steps)
    keep_n = int(min(max_records / per_step_n, max_bytes / per_step_b))
    keep_n = max(1, min(len(steps), keep_n))
    if keep_n == 1:
        kept = {steps[-1]}
    else:
        kept = {steps[round(i * (len(steps) - 1) / (keep_n - 1))] for i in range(keep_n)}
    out = [r for r in records if r["step"] in kept]
    note = (
        f"{len(records)} audit records from {len(steps)} steps ({total / 1e6:.1f} MB): showing the "
        f"{len(out)} records of {len(kept)} evenly spaced steps, to keep this page light"
    )
    return out, note


def _load_audits(run_dir: Path, limit: int, max_bytes: int = MAX_AUDIT_BYTES) -> tuple[list[dict], list[str]]:
    path = run_dir / "audits.jsonl"
    if not path.is_file():
        return [], ["No audits recorded: audits.jsonl was not found in the run directory."]
    raw, bad = _read_jsonl(path)
    notes = []
    if bad:
        notes.append(f"audits.jsonl: {bad} malformed line(s) skipped.")
    records = [_prepare_record(r) for r in raw]
    records.sort(key=lambda r: (r["step"], r["trajectory"]))
    if not records:
        notes.append("audits.jsonl has no audit records.")
    records, note = _subsample(records, limit, max_bytes) if records else (records, None)
    if note:
        notes.append(note)
    return records, notes

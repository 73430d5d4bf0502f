"""Persistent on-disk cache of teacher API responses, so a rerun (or a resumed run) never pays twice.

Not in the paper: the paper reports teacher effort, not how to avoid repeating it. A run that dies at
step 300 of 400 and restarts, or an ablation that replays the same rollouts against the same teacher,
would otherwise buy the same continuations again.

Key. SHA-256 of the canonical JSON of (backend, model, the exact request payload, the sampling
parameters). The payload is exactly the JSON body the SDK sends (prompt or messages, max tokens,
temperature, top_p, n, seed, extra body fields), never headers, so credentials cannot reach the key or
the table. The sampling parameters (temperature, top_p, the spec's seed and the sample index) are keyed
separately because not every payload carries them: the sample index tells apart the N identical
requests of a backend without ``n=``, and the seed makes another seed another draw even for Anthropic,
which sends none.

Value. The texts *as returned by the API* (before protocol post-processing, so changing the
post-processing needs no new requests) and the token counts the API reported.

Storage. One SQLite file in WAL mode; each insert is its own transaction, so a process killed mid-write
leaves the previous committed state (SQLite's atomic commit) and never a torn row. Several processes
(e.g. data-parallel ranks) may share one file: WAL allows concurrent readers and the busy timeout
serialises writers. ``synchronous=NORMAL`` is durable against a crash of the process (not against
power loss, where the last few inserts may be lost, which only costs a re-request).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class CachedResponse:
    texts: list[str]
    prompt_tokens: int
    completion_tokens: int


def cache_key(backend: str, model: str, payload: dict[str, Any], sampling: dict[str, Any]) -> str:
    """Stable hash of what determines a response. ``payload`` is the exact JSON body sent; ``sampling``
    holds the sampling parameters (temperature, top_p, seed, sample index) even where the payload
    cannot carry them (Anthropic sends no seed: another seed must still be another draw)."""
    blob = json.dumps(
        {"v": SCHEMA_VERSION, "backend": backend, "model": model, "payload": payload, "sampling": sampling},
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class ResponseCache:
    """Thread-safe (one connection behind a lock); the API teachers call it from their event-loop thread."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(str(self.path), timeout=30.0, check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS responses ("
            " key TEXT PRIMARY KEY,"
            " backend TEXT NOT NULL,"
            " model TEXT NOT NULL,"
            " texts TEXT NOT NULL,"  # JSON list of strings
            " prompt_tokens INTEGER NOT NULL,"
            " completion_tokens INTEGER NOT NULL,"
            " created REAL NOT NULL)"
        )

    def get(self, key: str) -> CachedResponse | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT texts, prompt_tokens, completion_tokens FROM responses WHERE key = ?", (key,)
            ).fetchone()
        if row is None:
            return None
        return CachedResponse(texts=list(json.loads(row[0])), prompt_tokens=int(row[1]), completion_tokens=int(row[2]))

    def put(self, key: str, backend: str, model: str, response: CachedResponse) -> None:
        texts = json.dumps(response.texts, ensure_ascii=False)
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.execute(
                    "INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (key, backend, model, texts, response.prompt_tokens, response.completion_tokens, time.time()),
                )
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def __len__(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM responses").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._conn.close()


__all__ = ["CachedResponse", "ResponseCache", "cache_key"]

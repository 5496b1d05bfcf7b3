"""A bounded on-disk FIFO for what the agent owes the controller while it is unreachable.

Messages routed to the controller and shadow updates are appended here first and removed
only after the controller acknowledged them, so delivery is at-least-once and in append
order, across agent restarts and ``kill -9`` (SQLite with ``synchronous=FULL``: an append
that returned is on disk).

Bound and drop policy. At most ``max_items`` entries are held. When full:

- ``drop-oldest``: the oldest entry is deleted to make room (fresh data is worth more
  than stale telemetry); counted in ``dropped``;
- ``reject-newest``: the new entry is refused (``put`` returns False); counted in
  ``rejected``.

Both counters are persisted with the entries and reported by :meth:`Spool.stats`, so an
operator sees loss even after a restart.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from edgevisor.devices.db import open_db

__all__ = ["DropPolicy", "Spool", "SpoolItem"]


class DropPolicy(StrEnum):
    DROP_OLDEST = "drop-oldest"
    REJECT_NEWEST = "reject-newest"


@dataclass(frozen=True, slots=True)
class SpoolItem:
    seq: int
    kind: str
    body: dict[str, Any]
    created_at: float


class Spool:
    def __init__(
        self,
        path: Path | str,
        *,
        max_items: int,
        policy: DropPolicy = DropPolicy.DROP_OLDEST,
    ) -> None:
        if max_items < 1:
            raise ValueError("max_items must be at least 1")
        self.max_items = max_items
        self.policy = DropPolicy(policy)
        self._conn: sqlite3.Connection = open_db(path)
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS spool (seq INTEGER PRIMARY KEY AUTOINCREMENT,"
            " kind TEXT NOT NULL, body TEXT NOT NULL, created_at REAL NOT NULL)"
        )
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS spool_counters (name TEXT PRIMARY KEY,"
            " value INTEGER NOT NULL)"
        )
        self._count = int(self._conn.execute("SELECT count(*) FROM spool").fetchone()[0])

    def close(self) -> None:
        self._conn.close()

    def __len__(self) -> int:
        return self._count

    def _bump(self, name: str, by: int = 1) -> None:
        self._conn.execute(
            "INSERT INTO spool_counters (name, value) VALUES (?, ?)"
            " ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
            (name, by),
        )

    def _counter(self, name: str) -> int:
        row = self._conn.execute(
            "SELECT value FROM spool_counters WHERE name = ?", (name,)
        ).fetchone()
        return 0 if row is None else int(row[0])

    def put(self, kind: str, body: dict[str, Any], *, now: float | None = None) -> bool:
        """Append durably; False if refused by ``reject-newest`` on a full spool."""
        text = json.dumps(body, separators=(",", ":"))
        ts = time.time() if now is None else now
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            if self._count >= self.max_items:
                if self.policy is DropPolicy.REJECT_NEWEST:
                    self._bump("rejected")
                    self._conn.execute("COMMIT")
                    return False
                excess = self._count - self.max_items + 1
                self._conn.execute(
                    "DELETE FROM spool WHERE seq IN"
                    " (SELECT seq FROM spool ORDER BY seq LIMIT ?)",
                    (excess,),
                )
                self._bump("dropped", excess)
                self._count -= excess
            self._conn.execute(
                "INSERT INTO spool (kind, body, created_at) VALUES (?, ?, ?)", (kind, text, ts)
            )
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")
        self._count += 1
        return True

    def peek(self, limit: int = 100) -> list[SpoolItem]:
        """The oldest ``limit`` entries, oldest first; nothing is removed."""
        rows = self._conn.execute(
            "SELECT seq, kind, body, created_at FROM spool ORDER BY seq LIMIT ?", (limit,)
        )
        return [SpoolItem(r[0], r[1], json.loads(r[2]), r[3]) for r in rows]

    def ack(self, upto_seq: int) -> int:
        """Remove every entry with ``seq <= upto_seq`` (delivered); returns how many."""
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            n = self._conn.execute("DELETE FROM spool WHERE seq <= ?", (upto_seq,)).rowcount
            self._bump("delivered", n)
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")
        self._count -= n
        return n

    async def drain(
        self,
        send: Callable[[Sequence[SpoolItem]], Awaitable[None]],
        *,
        batch: int = 100,
    ) -> int:
        """Deliver everything in order, one batch at a time; returns how many went out.

        ``send`` must raise (e.g. :class:`~edgevisor.errors.PeerUnavailable`) if the batch
        was not accepted; the batch then stays spooled and the error propagates after what
        was already delivered is acknowledged.
        """
        sent = 0
        while True:
            items = self.peek(batch)
            if not items:
                return sent
            await send(items)
            self.ack(items[-1].seq)
            sent += len(items)

    def stats(self) -> dict[str, Any]:
        return {
            "pending": self._count,
            "max_items": self.max_items,
            "policy": self.policy.value,
            "dropped": self._counter("dropped"),
            "rejected": self._counter("rejected"),
            "delivered": self._counter("delivered"),
        }


"""The agent's device database: one SQLite file in the data dir (stdlib ``sqlite3``).

Registry, routes, shadows and timers each own their tables in this file; the spool has its
own file so a full spool never competes with them. WAL mode so readers (the API) do not block
the writer; ``synchronous=FULL`` because a shadow version or a device credential that is
acknowledged and then lost on power failure would break optimistic concurrency.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

__all__ = ["open_db"]


def open_db(path: Path | str) -> sqlite3.Connection:
    """Open (creating if needed) a SQLite file for single-threaded use from the event loop."""
    if str(path) != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    # isolation_level=None: we issue BEGIN/COMMIT ourselves, so a transaction is explicit.
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=5000")
    return conn

"""The agent's persistent call journal: SQLite in WAL mode with ``synchronous=FULL``.

Async calls are written and committed *before* the caller gets the call id; on restart,
calls still ``queued`` or ``running`` are handed back to be re-enqueued (at-least-once).
A caller-supplied idempotency key is unique, so a retried submission finds the first call.

Writes go through one writer task that does *group commit*: everything submitted while
the previous transaction was committing goes into the next one, and each async submitter
is released only after the commit that holds its row. Final records of sync calls are
not waited for; they ride along in the next batch (written lazily), which keeps SQLite
off the warm path. SQLite runs on one dedicated thread so fsync never blocks the loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from edgevisor.errors import StoreUnavailable
from edgevisor.tasks.calls import CallRecord, CallState, TaskVersion
from edgevisor.tasks.spec import TaskSpec

__all__ = ["CallJournal", "JournalRow", "row_of"]

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS calls (
  id TEXT PRIMARY KEY,
  task TEXT NOT NULL,
  version TEXT NOT NULL,
  status TEXT NOT NULL,
  event TEXT,
  result TEXT,
  error TEXT,
  async INTEGER NOT NULL,
  idem_key TEXT,
  priority INTEGER NOT NULL,
  queue_wait_s REAL,
  init_s REAL,
  run_s REAL,
  logs TEXT NOT NULL DEFAULT '',
  created_at REAL NOT NULL,
  started_at REAL,
  finished_at REAL
);
CREATE UNIQUE INDEX IF NOT EXISTS ix_calls_idem ON calls(idem_key) WHERE idem_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS ix_calls_open ON calls(status) WHERE status IN ('queued','running');
CREATE TABLE IF NOT EXISTS task_versions (
  version TEXT PRIMARY KEY,
  name TEXT NOT NULL,
  bundle TEXT NOT NULL,
  spec TEXT NOT NULL,
  deployed_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS tasks (
  name TEXT PRIMARY KEY,
  version TEXT NOT NULL
);
"""

_COLS = (
    "id, task, version, status, event, result, error, async, idem_key, priority, "
    "queue_wait_s, init_s, run_s, logs, created_at, started_at, finished_at"
)
_UPSERT = (
    f"INSERT INTO calls ({_COLS}) VALUES ({','.join('?' * 17)}) "
    "ON CONFLICT(id) DO UPDATE SET status=excluded.status, result=excluded.result, "
    "error=excluded.error, queue_wait_s=excluded.queue_wait_s, init_s=excluded.init_s, "
    "run_s=excluded.run_s, logs=excluded.logs, started_at=excluded.started_at, "
    "finished_at=excluded.finished_at"
)

JournalRow = tuple[Any, ...]


def _dumps(v: Any) -> str | None:
    return None if v is None else json.dumps(v, separators=(",", ":"))


def _row(s: CallState, event_json: str | None = None, result_json: str | None = None) -> JournalRow:
    return (
        s.id,
        s.task,
        s.version,
        s.status,
        event_json if event_json is not None else (s.event_json or _dumps(s.event)),
        result_json if result_json is not None else _dumps(s.result),
        _dumps(s.error),
        int(s.async_),
        s.idempotency_key,
        s.priority,
        s.queue_wait_s,
        s.init_s,
        s.run_s,
        s.logs,
        s.created_at,
        s.started_at,
        s.finished_at,
    )


def _record(row: sqlite3.Row) -> CallRecord:
    def loads(v: str | None) -> Any:
        return None if v is None else json.loads(v)

    return CallRecord(
        id=row["id"],
        task=row["task"],
        version=row["version"],
        status=row["status"],
        event=loads(row["event"]),
        result=loads(row["result"]),
        error=loads(row["error"]),
        async_=bool(row["async"]),
        idempotency_key=row["idem_key"],
        priority=row["priority"],
        queue_wait_s=row["queue_wait_s"],
        init_s=row["init_s"],
        run_s=row["run_s"],
        logs=row["logs"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
    )


class CallJournal:
    """Calls and deployed task versions in ``<data_dir>/calls.db``."""

    def __init__(self, path: Path, *, lazy_delay_s: float = 0.05) -> None:
        self.path = path
        self.lazy_delay_s = lazy_delay_s
        self._exec = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgevisor-journal")
        self._conn: sqlite3.Connection | None = None
        self._buf: list[JournalRow] = []
        self._waiters: list[asyncio.Future[None]] = []
        self._kick = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._closing = False

    # -- lifecycle -----------------------------------------------------------------------

    async def open(self) -> None:
        await self._run(self._open_sync)
        self._writer = asyncio.create_task(self._write_loop(), name="edgevisor-journal")

    def _open_sync(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.executescript(_SCHEMA)
        self._conn = conn

    async def close(self) -> None:
        self._closing = True
        self._kick.set()
        if self._writer is not None:
            await self._writer
        await self._run(self._close_sync)
        self._exec.shutdown(wait=True)

    def _close_sync(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def _run(self, fn: Any, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._exec, fn, *args)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"call journal {self.path}: {exc}") from exc

    # -- writes --------------------------------------------------------------------------

    async def persist(self, row: JournalRow) -> None:
        """Write ``row`` and return once it is committed (the ack point of async calls)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._buf.append(row)
        self._waiters.append(fut)
        self._kick.set()
        await fut

    def persist_lazily(self, row: JournalRow) -> None:
        """Write ``row`` in a later batch; nobody waits for it."""
        self._buf.append(row)
        if len(self._buf) == 1:
            self._kick.set()

    async def flush(self) -> None:
        """Return once everything submitted so far is committed."""
        if self._buf:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            self._kick.set()
            await fut

    async def _write_loop(self) -> None:
        while True:
            await self._kick.wait()
            self._kick.clear()
            if not self._waiters and not self._closing:
                # only lazy rows: let more gather (one commit per batch, not per call)
                await asyncio.sleep(self.lazy_delay_s)
            rows, waiters = self._buf, self._waiters
            self._buf, self._waiters = [], []
            if rows:
                try:
                    await self._run(self._write_sync, rows)
                except Exception as exc:  # the writer must outlive a bad batch
                    log.exception("call journal: a batch of %d rows was not written", len(rows))
                    err = exc if isinstance(exc, StoreUnavailable) else StoreUnavailable(str(exc))
                    for w in waiters:
                        if not w.done():
                            w.set_exception(err)
                    waiters = []
            for w in waiters:
                if not w.done():
                    w.set_result(None)
            if self._closing and not self._buf:
                return

    def _write_sync(self, rows: list[JournalRow]) -> None:
        assert self._conn is not None
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(_UPSERT, rows)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    # -- reads ---------------------------------------------------------------------------

    async def open_calls(self) -> list[CallRecord]:
        """Calls not finished (queued or running), oldest first: to re-enqueue."""
        return list(await self._run(self._open_calls_sync))

    def _open_calls_sync(self) -> list[CallRecord]:
        assert self._conn is not None
        cur = self._conn.execute(
            "SELECT * FROM calls WHERE status IN ('queued','running') ORDER BY created_at, rowid"
        )
        return [_record(r) for r in cur.fetchall()]

    async def get(self, call_id: str) -> CallRecord | None:
        rec: CallRecord | None = await self._run(self._get_sync, "id", call_id)
        return rec

    async def by_idempotency_key(self, key: str) -> CallRecord | None:
        rec: CallRecord | None = await self._run(self._get_sync, "idem_key", key)
        return rec

    def _get_sync(self, column: str, value: str) -> CallRecord | None:
        assert self._conn is not None
        row = self._conn.execute(f"SELECT * FROM calls WHERE {column} = ?", (value,)).fetchone()
        return _record(row) if row else None

    async def prune(self, finished_before: float) -> int:
        """Delete finished calls that ended before ``finished_before`` (unix time)."""
        n: int = await self._run(self._prune_sync, finished_before)
        return n

    def _prune_sync(self, finished_before: float) -> int:
        assert self._conn is not None
        cur = self._conn.execute(
            "DELETE FROM calls WHERE status NOT IN ('queued','running') AND finished_at < ?",
            (finished_before,),
        )
        return cur.rowcount

    # -- task versions -------------------------------------------------------------------

    async def save_task(self, tv: TaskVersion) -> None:
        await self._run(self._save_task_sync, tv)

    def _save_task_sync(self, tv: TaskVersion) -> None:
        assert self._conn is not None
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(
            "INSERT OR REPLACE INTO task_versions (version, name, bundle, spec, deployed_at) "
            "VALUES (?,?,?,?,?)",
            (tv.version, tv.name, tv.bundle, tv.spec.model_dump_json(), tv.deployed_at),
        )
        conn.execute(
            "INSERT OR REPLACE INTO tasks (name, version) VALUES (?,?)", (tv.name, tv.version)
        )
        conn.execute("COMMIT")

    async def remove_task(self, name: str) -> None:
        await self._run(self._remove_task_sync, name)

    def _remove_task_sync(self, name: str) -> None:
        assert self._conn is not None
        self._conn.execute("DELETE FROM tasks WHERE name = ?", (name,))

    async def load_tasks(self) -> tuple[dict[str, str], dict[str, TaskVersion]]:
        """(current version per task name, every known version by version id)."""
        out: tuple[dict[str, str], dict[str, TaskVersion]] = await self._run(self._load_sync)
        return out

    def _load_sync(self) -> tuple[dict[str, str], dict[str, TaskVersion]]:
        assert self._conn is not None
        current = {r["name"]: r["version"] for r in self._conn.execute("SELECT * FROM tasks")}
        versions = {
            r["version"]: TaskVersion(
                name=r["name"],
                version=r["version"],
                bundle=r["bundle"],
                spec=TaskSpec.model_validate_json(r["spec"]),
                deployed_at=r["deployed_at"],
            )
            for r in self._conn.execute("SELECT * FROM task_versions")
        }
        return current, versions


def row_of(
    s: CallState, event_json: str | None = None, result_json: str | None = None
) -> JournalRow:
    """The journal row of a call state (JSON payloads may be passed pre-encoded)."""
    return _row(s, event_json, result_json)

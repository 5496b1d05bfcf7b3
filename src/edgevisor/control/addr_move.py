"""The remap hot path: ``POST /v1/addresses/{ref}/move`` in one lean SQLite transaction.

The Session path of a move (:func:`edgevisor.network.records.move_from` plus the push
planning of :mod:`.addr_sync`) builds a dozen SQLAlchemy statements per call; profiled
on this VM, their construction, cache keys and result processing cost ~6 ms of Python
per move against ~1 ms of SQLite work. :class:`FastMover` does the same transaction on
one DBAPI connection it keeps, with fixed SQL texts (``sqlite3`` prepares each once):

``BEGIN IMMEDIATE``; the account's id (admin), the target host, the account's bound
records per host, the record; the physical cursor (or the free-list's oldest entry);
the old physical to the free-list; the compare-and-set of the record; its history row;
the ``address.moved`` event; the endpoints and, when a host joins or leaves the
account's set, the records it needs or must drop; ``COMMIT``.

The guarantees are the Session path's: the same rows are written in one transaction
(history and event included), the record update is a compare-and-set on ``generation``,
and the unique indexes keep one physical address in one record. This connection runs
``PRAGMA synchronous=FULL``: a move that returned is on disk (WAL fsync, ~0.2 ms here),
not only in the OS cache, because the caller (a migration's switch) acts on it.

The caller runs it on its event loop (no thread hop: under load, handing the call to a
worker thread and back costs more than the transaction), so it must never wait:
with ``wait=False`` the write lock is tried without the busy timeout, and
:class:`Busy` is raised when another writer holds it; the caller then runs the move in a
thread (``wait=True``).

Anything out of the common case (a record named by id, an unknown account, host or
record, a state or generation that refuses the move, an empty physical pool, a
constraint error) rolls back and returns None: the caller then runs the Session path,
which has the full logic and the exact errors. SQLite only; on PostgreSQL the Session
path serves every move.
"""

from __future__ import annotations

import contextlib
import json
import threading
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine

from edgevisor.control.addr_sync import Push, event_data, plan_push
from edgevisor.errors import RequestError
from edgevisor.network.fast_alloc import sqlite_timestamp
from edgevisor.network.lifecycle import State
from edgevisor.network.pools import canonical, pool_for, utcnow
from edgevisor.network.records import AddressRecord

__all__ = ["Busy", "FastMover"]

_COLS = (
    "id, account, network_id, logical, physical_pool_id, physical, host, instance, "
    "state, generation, held_until, created_at, updated_at"
)
_ACCOUNT = "SELECT id FROM accounts WHERE name = ?"
_HOST = "SELECT 1 FROM hosts WHERE name = ?"
_PER_HOST = (
    "SELECT host, count(*) FROM address_records WHERE account = ? AND state = 'bound' GROUP BY host"
)
_LOAD = f"SELECT {_COLS} FROM address_records WHERE account = ? AND logical = ?"
_TAKE = (
    "UPDATE physical_pools SET next_offset = next_offset + 1 WHERE host_group = ? "
    "AND family = ? AND next_offset < cursor_limit "
    "RETURNING id, next_offset, cidr, gateway, reserve_edges, host_group"
)
_POOL = "SELECT id FROM physical_pools WHERE host_group = ? AND family = ?"
_POP = (
    "DELETE FROM physical_free_addresses WHERE id = (SELECT id FROM "
    "physical_free_addresses WHERE pool_id = ? ORDER BY id LIMIT 1) RETURNING address"
)
_FREE = "INSERT INTO physical_free_addresses (pool_id, address) VALUES (?, ?)"
_CAS = (
    "UPDATE address_records SET host = ?, physical_pool_id = ?, physical = ?, "
    "state = 'bound', generation = ?, updated_at = ?, missing_since = NULL, "
    "missing_generation = NULL WHERE id = ? AND generation = ?"
)
_HIST = (
    "INSERT INTO address_history (record_id, account, network_id, address, event, "
    "from_state, to_state, instance, host, physical, generation, at) "
    "VALUES (?, ?, ?, ?, 'move', 'bound', 'bound', ?, ?, ?, ?, ?)"
)
_EVENT = (
    "INSERT INTO events (at, kind, account_id, subject, data) VALUES (?, 'address.moved', ?, ?, ?)"
)
_ENDPOINTS = "SELECT name, agent_url, agent_key, state FROM hosts WHERE name IN ({})"
_BOUND = f"SELECT {_COLS} FROM address_records WHERE account = ? AND state = 'bound' ORDER BY id"
_APPLIED = (
    f"SELECT {', '.join('r.' + c for c in _COLS.split(', '))} FROM address_records r "
    "JOIN address_host_applied a ON a.record_id = r.id "
    "WHERE a.host = ? AND r.account = ?"
)


class _Slow(Exception):
    """The hot path does not serve this move; the Session path will."""


class Busy(Exception):
    """Another writer holds the store's write lock (``wait=False``); nothing changed."""


#: The busy timeout with ``wait=True`` (the Session path's).
BUSY_TIMEOUT_MS = 30_000


class _Host:
    """A ``hosts`` row as :func:`~edgevisor.control.addr_sync.plan_push` reads it."""

    __slots__ = ("agent_key", "agent_url", "state")

    def __init__(self, url: str | None, key: str | None, state: str) -> None:
        self.agent_url, self.agent_key, self.state = url, key, state


def _dt(value: Any) -> datetime | None:
    """A :class:`~edgevisor.store.network_models.UTCDateTime` column read raw (text)."""
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.replace(tzinfo=UTC)
    return datetime.fromisoformat(str(value)).replace(tzinfo=UTC)


def _record(row: tuple[Any, ...]) -> AddressRecord:
    return AddressRecord(
        id=row[0],
        account=row[1],
        network_id=row[2],
        logical=row[3],
        physical=row[5],
        host=row[6],
        instance=row[7],
        state=State(row[8]),
        generation=row[9],
        held_until=_dt(row[10]),
        created_at=_dt(row[11]),  # type: ignore[arg-type]
        updated_at=_dt(row[12]),  # type: ignore[arg-type]
    )


class FastMover:
    """Moves of bound records on one dedicated SQLite connection (see the module doc)."""

    def __init__(self, engine: Engine) -> None:
        if engine.dialect.name != "sqlite":
            raise ValueError("FastMover supports SQLite only (PostgreSQL: the Session path)")
        self._engine = engine
        self._lock = threading.Lock()
        self._proxy: Any = None
        self._dbapi: Any = None
        self._cur: Any = None
        self._waits = True  # the connection's busy timeout is BUSY_TIMEOUT_MS

    def _conn(self) -> Any:
        if self._dbapi is None:
            proxy = self._engine.raw_connection()
            dbapi: Any = proxy.driver_connection
            if dbapi.isolation_level is not None:
                proxy.close()
                raise ValueError("a SQLite engine needs records.configure_sqlite() first")
            cur = dbapi.cursor()
            # Committed = on disk for this path (see the module doc); per connection.
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            self._proxy, self._dbapi, self._cur, self._waits = proxy, dbapi, cur, True
        return self._dbapi

    def close(self) -> None:
        with self._lock:
            if self._proxy is not None:
                with contextlib.suppress(Exception):
                    # Back to what the pool's other users expect (configure_sqlite's).
                    self._cur.execute("PRAGMA synchronous=NORMAL")
                    self._cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
                    self._cur.close()
                self._proxy.close()
            self._proxy = self._dbapi = self._cur = None

    def _drop(self) -> None:
        proxy, self._proxy, self._dbapi, self._cur = self._proxy, None, None, None
        self._waits = True
        if proxy is not None:
            with contextlib.suppress(Exception):  # already broken; nothing to release
                proxy.invalidate()

    def move(
        self,
        st: Any,
        *,
        account: str,
        account_id: int | None,
        ref: str,
        host: str,
        host_group: str,
        expected_generation: int | None,
        now: datetime | None = None,
        wait: bool = True,
    ) -> Push | None:
        """Move the bound record ``ref`` (a logical address) of ``account`` to ``host``.

        ``account_id`` None: look it up (the admin named the account). Returns the
        :class:`Push` as :func:`edgevisor.control.api_addresses.move` makes it, or None
        when the Session path must serve the call (nothing was changed then). With
        ``wait=False`` it raises :class:`Busy` instead of waiting for a lock.
        """
        if ref.isdigit():
            return None  # by record id: the Session path checks the owner first
        try:
            logical = canonical(ref)
        except RequestError:
            return None
        now = utcnow(now)
        if not self._lock.acquire(blocking=wait):
            raise Busy
        try:
            conn = self._conn()
            cur = self._cur
            if wait != self._waits:
                cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS if wait else 0}")
                self._waits = wait
            try:
                try:
                    cur.execute("BEGIN IMMEDIATE")
                except conn.OperationalError as exc:
                    if not wait and "locked" in str(exc):
                        raise Busy from exc
                    raise
                push = self._move(
                    cur,
                    st,
                    account,
                    account_id,
                    logical,
                    host,
                    host_group,
                    expected_generation,
                    now,
                )
                cur.execute("COMMIT")
                return push
            except _Slow:
                self._rollback(conn)
                return None
            except conn.IntegrityError:
                self._rollback(conn)
                return None
            except BaseException:
                if not self._rollback(conn):
                    self._drop()
                raise
        finally:
            self._lock.release()

    @staticmethod
    def _rollback(conn: Any) -> bool:
        try:
            conn.rollback()
        except Exception:
            return False
        return True

    def _move(
        self,
        cur: Any,
        st: Any,
        account: str,
        account_id: int | None,
        logical: str,
        host: str,
        host_group: str,
        expected: int | None,
        now: datetime,
    ) -> Push:
        if account_id is None:
            cur.execute(_ACCOUNT, (account,))
            got = cur.fetchone()
            if got is None:
                raise _Slow
            account_id = int(got[0])
        cur.execute(_HOST, (host,))
        if cur.fetchone() is None:
            raise _Slow
        cur.execute(_PER_HOST, (account,))
        per_host = {h: int(n) for h, n in cur.fetchall() if h}
        cur.execute(_LOAD, (account, logical))
        row = cur.fetchone()
        if row is None or row[8] != State.BOUND.value or row[6] == host:
            raise _Slow  # the Session path raises the exact error
        if expected is not None and expected != row[9]:
            raise _Slow
        family = 6 if ":" in logical else 4
        pool_id, physical = self._physical(cur, host_group, family)
        if row[4] is not None and row[5] is not None:
            cur.execute(_FREE, (row[4], row[5]))
        gen = row[9] + 1
        ts = sqlite_timestamp(now)
        cur.execute(_CAS, (host, pool_id, physical, gen, ts, row[0], row[9]))
        if cur.rowcount != 1:
            raise _Slow
        old = _record(row)
        rec = AddressRecord(
            id=old.id,
            account=old.account,
            network_id=old.network_id,
            logical=old.logical,
            physical=physical,
            host=host,
            instance=old.instance,
            state=State.BOUND,
            generation=gen,
            held_until=old.held_until,
            created_at=old.created_at,
            updated_at=_dt(ts),  # type: ignore[arg-type]
        )
        cur.execute(
            _HIST, (rec.id, account, rec.network_id, logical, rec.instance, host, physical, gen, ts)
        )
        cur.execute(_EVENT, (st.clock(), account_id, logical, json.dumps(event_data(rec))))
        before = set(per_host)
        after = set(per_host)
        if old.host is not None and per_host.get(old.host, 0) <= 1:
            after.discard(old.host)
        after.add(host)
        change = Push(rec, before, after, first=old.host)
        self._resolve(cur, st, change)
        return change

    def _physical(self, cur: Any, host_group: str, family: int) -> tuple[int, str]:
        """A physical address as :func:`~edgevisor.network.pools.allocate_physical`
        takes it: the cursor first, then the free-list's oldest entry."""
        while True:
            cur.execute(_TAKE, (host_group, family))
            got = cur.fetchone()
            if got is None:
                break
            pool_id, cursor, cidr, gateway, reserve_edges, group = got
            pool = pool_for(cidr, gateway, bool(reserve_edges), f"physical:{group}")
            if cursor - 1 not in pool.reserved:
                return int(pool_id), str(pool.address_at(cursor - 1))
        cur.execute(_POOL, (host_group, family))
        got = cur.fetchone()
        if got is None:
            raise _Slow  # no pool: the Session path names what to add
        cur.execute(_POP, (got[0],))
        popped = cur.fetchone()
        if popped is None:
            raise _Slow  # exhausted: the Session path says so
        return int(got[0]), str(popped[0])

    @staticmethod
    def _resolve(cur: Any, st: Any, change: Push) -> None:
        """:func:`~edgevisor.control.addr_sync.resolve_endpoints` on this connection."""
        account = change.record.account

        def bound() -> list[AddressRecord]:
            cur.execute(_BOUND, (account,))
            return [_record(r) for r in cur.fetchall()]

        def hosts(names: list[str]) -> dict[str, Any]:
            cur.execute(_ENDPOINTS.format(", ".join("?" * len(names))), names)
            return {n: _Host(u, k, s) for n, u, k, s in cur.fetchall()}

        def applied(host: str) -> list[AddressRecord]:
            cur.execute(_APPLIED, (host, account))
            return [_record(r) for r in cur.fetchall()]

        plan_push(change, is_local=st.links.is_local, bound=bound, hosts=hosts, applied=applied)

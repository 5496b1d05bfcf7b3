"""The allocation hot path: one dedicated connection, prepared statements, few round trips.

:func:`edgevisor.network.records.allocate` runs inside a caller's ORM ``Session``; the
Session's own begin/flush/commit machinery costs more than the allocation (a bare 2-row
insert transaction through a Session is ~2,500/s here). :class:`FastAllocator` does the
same allocation on one DBAPI connection it keeps, with fixed SQL texts that the driver
prepares once (``sqlite3``'s statement cache; psycopg prepares after a few executions):

- cursor (the common case, any pool size): ``BEGIN IMMEDIATE`` (SQLite), ``UPDATE networks
  ... next_offset + 1 ... RETURNING``, ``INSERT address_records ... ON CONFLICT DO
  NOTHING``, ``INSERT address_history``, ``COMMIT``;
- free-list (the cursor is at its end, which is permanent: the cursor never moves back):
  one ``DELETE ... WHERE id = (oldest) RETURNING address`` pops the oldest entry, then the
  same two inserts. PostgreSQL first locks the network row (``FOR UPDATE``), so pops of
  one network stay serialised as in the Session path.

Per allocation, the work that is not the database's is kept small, because in a
controller an allocation runs between other work that has evicted the CPU caches, so
every instruction is a cold one (profiled: ~2x the cost of back-to-back allocations):
positional parameters; one cursor kept with the connection; ``COMMIT`` as a cached
statement (``sqlite3``'s ``commit()`` compiles it every time); the cursor's ``UPDATE``
returns three integers and the network's pool (CIDR, reservations) is cached by network
id, which is never reused (``AUTOINCREMENT``), so a network deleted and created again
under the same name is a new entry; IPv4 text without ``ipaddress`` objects; on SQLite
the record id from ``lastrowid`` (no ``RETURNING`` row to fetch) and the timestamp
formatted once, in the dialect's own text format.

Guarantees are the store's, unchanged: the unique key ``(account, logical)`` with ``ON
CONFLICT DO NOTHING`` means no address is handed out twice, on SQLite and PostgreSQL, by
any number of processes; the history row is written in the same transaction. Anything the
hot path does not cover (a specific address, an empty free-list with holds to end, an
exhausted pool, a missing network) rolls back and runs the Session path
(:func:`~edgevisor.network.records.allocate`), which has the full logic and errors.

One allocator serialises its callers on a lock (one connection); make one per process or
per worker thread. The ``now`` argument exists for tests (a fixed clock).

Other writes of the same caller belong on the same connection: :meth:`FastAllocator.session`
(a Session in one transaction on it; the Session path's fallback uses it too). On SQLite a
commit by *another* connection makes this one discard its whole page cache (WAL: the
reader sees a changed wal-index header and resets its pager), so the next allocation reads
every page it touches again, ~3x the cost of an allocation after one of its own
(profiled: 73 us vs 217 us at p50 with one tiny foreign write in between). A caller that
releases through :meth:`session` keeps the cache warm; releases on other connections still
work, at that cost.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Engine
from sqlalchemy.orm import Session

from edgevisor.network import records
from edgevisor.network.ipam import AddressPool
from edgevisor.network.lifecycle import State
from edgevisor.network.pools import pool_for, utcnow
from edgevisor.network.records import AddressRecord
from edgevisor.store.network_models import UTCDateTime

__all__ = ["FastAllocator", "sqlite_timestamp"]

# Positional ("?") parameters; PostgreSQL gets "%s" (no literal in these texts has a "?").
_TAKE = (
    "UPDATE networks SET next_offset = next_offset + 1 WHERE account = ? AND name = ? "
    "AND next_offset < cursor_limit RETURNING id, next_offset, cursor_limit"
)
_NET = "SELECT account, name, cidr, gateway, reserve_edges FROM networks WHERE id = ?"
_LOCK_NET = "SELECT id FROM networks WHERE id = ? FOR UPDATE"
_POP = (
    "DELETE FROM network_free_addresses WHERE id = (SELECT id FROM network_free_addresses "
    "WHERE network_id = ? ORDER BY id LIMIT 1) RETURNING address"
)
_INS_REC = (
    "INSERT INTO address_records (account, network_id, logical, state, generation, "
    "created_at, updated_at) VALUES (?, ?, ?, 'allocated', 1, ?, ?) ON CONFLICT DO NOTHING"
)
_INS_HIST = (
    "INSERT INTO address_history (record_id, account, network_id, address, event, "
    "from_state, to_state, instance, host, physical, generation, at) VALUES (?, ?, ?, ?, "
    "'allocate', NULL, 'allocated', NULL, NULL, NULL, 1, ?)"
)


def sqlite_timestamp(now: datetime) -> str:
    """``now`` as :class:`UTCDateTime` stores it on SQLite (naive UTC, SQLAlchemy's fixed
    ``YYYY-MM-DD HH:MM:SS.ffffff`` text, so string comparisons order by time)."""
    if now.tzinfo is not UTC:
        now = now.astimezone(UTC)
    return (
        f"{now.year:04d}-{now.month:02d}-{now.day:02d} "
        f"{now.hour:02d}:{now.minute:02d}:{now.second:02d}.{now.microsecond:06d}"
    )


class _Slow(Exception):
    """The hot path cannot serve this allocation; the Session path will."""


class _Net:
    """What the hot path needs of one network, cached by id (immutable but the cursor)."""

    __slots__ = ("pool", "reserved", "v4_base")

    def __init__(self, pool: AddressPool) -> None:
        self.pool = pool
        self.reserved = pool.reserved
        self.v4_base = int(pool.network.network_address) if pool.family == 4 else None

    def address(self, offset: int) -> str:
        if self.v4_base is not None:
            return socket.inet_ntoa((self.v4_base + offset).to_bytes(4, "big"))
        return str(self.pool.address_at(offset))


class FastAllocator:
    """Allocate logical addresses of account networks on one dedicated connection."""

    def __init__(self, engine: Engine) -> None:
        dialect = engine.dialect.name
        if dialect not in ("sqlite", "postgresql"):
            raise ValueError(f"FastAllocator supports SQLite and PostgreSQL, not {dialect}")
        self._engine = engine
        self._pg = dialect == "postgresql"
        if self._pg:
            # The dialect's own conversion of the column type (naive UTC datetime).
            bind = UTCDateTime().dialect_impl(engine.dialect).bind_processor(engine.dialect)
            self._ts: Callable[[datetime], Any] = bind if bind is not None else (lambda v: v)
        else:
            self._ts = sqlite_timestamp
        self._take, self._net, self._lock_net, self._pop, self._ins_hist = (
            self._text(q) for q in (_TAKE, _NET, _LOCK_NET, _POP, _INS_HIST)
        )
        # SQLite: the new id is ``lastrowid`` (a row to fetch costs a round of the VM).
        self._ins_rec = self._text(_INS_REC + (" RETURNING id" if self._pg else ""))
        # Reentrant so that an allocation inside session() is refused, not a deadlock.
        self._lock = threading.RLock()
        self._in_session = False
        self._sa: Connection | None = None
        self._dbapi: Any = None
        self._cur: Any = None
        self._nets: dict[int, _Net] = {}
        # (account, network) -> id of networks whose cursor is at its end: it never moves
        # back, so they allocate from the free-list from then on.
        self._exhausted: dict[tuple[str, str], int] = {}

    def _text(self, sql: str) -> str:
        if self._pg:
            return sql.replace("?", "%s")
        return sql.replace(" FOR UPDATE", "")

    # -- connection ------------------------------------------------------------------------

    def _conn(self) -> Any:
        # One SQLAlchemy Connection: the hot path drives its DBAPI connection directly,
        # session() binds a Session to it; both see one page cache.
        if self._dbapi is None:
            sa = self._engine.connect()
            dbapi: Any = sa.connection.driver_connection
            if not self._pg and dbapi.isolation_level is not None:
                sa.close()
                raise ValueError("a SQLite engine needs records.configure_sqlite() first")
            self._sa, self._dbapi, self._cur = sa, dbapi, dbapi.cursor()
        return self._dbapi

    def _drop(self) -> None:
        """Forget a connection that failed (the pool discards it)."""
        sa, self._sa, self._dbapi, self._cur = self._sa, None, None, None
        if sa is not None:
            with contextlib.suppress(Exception):  # already broken; nothing to release
                sa.invalidate()
                sa.close()

    def close(self) -> None:
        with self._lock:
            if self._sa is not None:
                with contextlib.suppress(Exception):
                    self._cur.close()
                self._sa.close()
            self._sa = self._dbapi = self._cur = None

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """A Session in one transaction on the allocator's connection, for other writes.

        Commits when the block ends, rolls back (nothing changed) if it raises. Holds the
        allocator's lock meanwhile; allocating from the allocator inside the block is
        refused (``RuntimeError``): use ``records.allocate`` on the Session instead.
        """
        with self._lock:
            if self._in_session:
                raise RuntimeError("FastAllocator.session() does not nest")
            self._conn()
            sa = self._sa
            assert sa is not None
            self._in_session = True
            try:
                with Session(bind=sa, expire_on_commit=False) as s, s.begin():
                    yield s
            except BaseException:
                if sa.invalidated or sa.closed:
                    self._drop()
                raise
            finally:
                self._in_session = False

    # -- public ------------------------------------------------------------------------------

    def allocate(
        self, *, account: str, network: str, now: datetime | None = None
    ) -> AddressRecord:
        """Any free address of ``network`` to ``account``, in one transaction of its own."""
        return self.allocate_many(account=account, network=network, n=1, now=now)[0]

    def allocate_many(
        self, *, account: str, network: str, n: int, now: datetime | None = None
    ) -> list[AddressRecord]:
        """``n`` addresses in one transaction: all of them, or none (the error says why)."""
        if n < 1:
            raise ValueError(f"n must be >= 1, not {n}")
        now = utcnow(now)
        with self._lock:
            if self._in_session:
                raise RuntimeError("allocate inside FastAllocator.session(): use records.allocate")
            try:
                return self._fast(account, network, n, now)
            except _Slow:
                pass
            return self._slow(account, network, n, now)

    # -- internals ---------------------------------------------------------------------------

    def _fast(self, account: str, network: str, n: int, now: datetime) -> list[AddressRecord]:
        conn = self._conn()
        cur = self._cur
        try:
            if not self._pg:
                cur.execute("BEGIN IMMEDIATE")
            ts = self._ts(now)
            out = [self._one(cur, account, network, now, ts) for _ in range(n)]
            if self._pg:
                conn.commit()
            else:
                cur.execute("COMMIT")  # a cached statement; conn.commit() compiles one
            return out
        except _Slow:
            self._rollback(conn)
            raise
        except BaseException:
            if not self._rollback(conn):
                self._drop()
            raise

    def _rollback(self, conn: Any) -> bool:
        try:
            conn.rollback()
        except Exception:
            return False
        return True

    def _network(self, cur: Any, nid: int) -> _Net:
        net = self._nets.get(nid)
        if net is None:
            cur.execute(self._net, (nid,))
            acct, name, cidr, gateway, reserve_edges = cur.fetchone()
            net = self._nets[nid] = _Net(
                pool_for(cidr, gateway, bool(reserve_edges), f"{acct}/{name}")
            )
        return net

    def _one(
        self, cur: Any, account: str, network: str, now: datetime, ts: Any
    ) -> AddressRecord:
        key = (account, network)
        nid = self._exhausted.get(key)
        while nid is None:  # fresh addresses first, from the cursor
            cur.execute(self._take, (account, network))
            row = cur.fetchone()
            if row is None:
                raise _Slow  # cursor at its end (the Session path learns which), or none
            net_id, cursor, limit = row
            if cursor >= limit:
                self._exhausted[key] = net_id
            net = self._network(cur, net_id)
            offset = cursor - 1
            if offset in net.reserved:
                nid = self._exhausted.get(key)
                continue
            got = self._insert(cur, account, net_id, net.address(offset), now, ts)
            if got is not None:
                return got
            nid = self._exhausted.get(key)  # taken by a specific request: skip it
        if self._pg:
            cur.execute(self._lock_net, (nid,))
            if cur.fetchone() is None:
                self._exhausted.pop(key, None)
                raise _Slow
        while True:  # then the free-list, oldest first
            cur.execute(self._pop, (nid,))
            row = cur.fetchone()
            if row is None:
                # Empty (holds may be over), or the network was deleted: the Session path.
                self._exhausted.pop(key, None)
                raise _Slow
            got = self._insert(cur, account, nid, str(row[0]), now, ts)
            if got is not None:
                return got

    def _insert(
        self, cur: Any, account: str, nid: int, logical: str, now: datetime, ts: Any
    ) -> AddressRecord | None:
        cur.execute(self._ins_rec, (account, nid, logical, ts, ts))
        if self._pg:
            row = cur.fetchone()
            if row is None:
                return None  # the unique key is taken: never two records for one address
            rid = int(row[0])
        else:
            if cur.rowcount != 1:
                return None  # ON CONFLICT DO NOTHING changed no row: the key is taken
            rid = int(cur.lastrowid)
        cur.execute(self._ins_hist, (rid, account, nid, logical, ts))
        return AddressRecord(
            id=rid, account=account, network_id=nid, logical=logical, physical=None,
            host=None, instance=None, state=State.ALLOCATED, generation=1, held_until=None,
            created_at=now, updated_at=now,
        )

    def _slow(self, account: str, network: str, n: int, now: datetime) -> list[AddressRecord]:
        with self.session() as s:
            return [records.allocate(s, account=account, network=network, now=now)
                    for _ in range(n)]

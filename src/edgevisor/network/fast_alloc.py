"""The allocation hot path: one dedicated connection, prepared statements, few round trips.

:func:`edgevisor.network.records.allocate` runs inside a caller's ORM ``Session``; the
Session's own begin/flush/commit machinery costs more than the allocation (a bare 2-row
insert transaction through a Session is ~2,500/s here). :class:`FastAllocator` does the
same allocation on one DBAPI connection it keeps, with fixed SQL texts that the driver
prepares once (``sqlite3``'s statement cache; psycopg prepares after a few executions):

- cursor (the common case, any pool size): ``BEGIN IMMEDIATE`` (SQLite), ``UPDATE networks
  ... next_offset + 1 ... RETURNING``, ``INSERT address_records ... ON CONFLICT DO NOTHING
  RETURNING id``, ``INSERT address_history``, ``COMMIT``;
- free-list (the cursor is at its end, which is permanent: the cursor never moves back):
  one ``DELETE ... WHERE id = (oldest) RETURNING address`` pops the oldest entry, then the
  same two inserts. PostgreSQL first locks the network row (``FOR UPDATE``), so pops of
  one network stay serialised as in the Session path.

Guarantees are the store's, unchanged: the unique key ``(account, logical)`` with ``ON
CONFLICT DO NOTHING`` means no address is handed out twice, on SQLite and PostgreSQL, by
any number of processes; the history row is written in the same transaction. Anything the
hot path does not cover (a specific address, an empty free-list with holds to end, an
exhausted pool, a missing network) rolls back and runs the Session path
(:func:`~edgevisor.network.records.allocate`), which has the full logic and errors.

One allocator serialises its callers on a lock (one connection); make one per process or
per worker thread. The ``now`` argument exists for tests (a fixed clock).
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from edgevisor.network import records
from edgevisor.network.lifecycle import State
from edgevisor.network.pools import pool_for, utcnow
from edgevisor.network.records import AddressRecord
from edgevisor.store.network_models import UTCDateTime

__all__ = ["FastAllocator"]

_NET_COLS = "id, account, name, cidr, gateway, reserve_edges, next_offset, cursor_limit"
_TAKE = (
    "UPDATE networks SET next_offset = next_offset + 1 WHERE account = :account "
    f"AND name = :name AND next_offset < cursor_limit RETURNING {_NET_COLS}"
)
_LOCK_NET = "SELECT id FROM networks WHERE id = :nid FOR UPDATE"
_POP = (
    "DELETE FROM network_free_addresses WHERE id = (SELECT id FROM network_free_addresses "
    "WHERE network_id = :nid ORDER BY id LIMIT 1) RETURNING address"
)
_INS_REC = (
    "INSERT INTO address_records (account, network_id, logical, state, generation, "
    "created_at, updated_at) VALUES (:account, :nid, :logical, 'allocated', 1, :now, :now) "
    "ON CONFLICT DO NOTHING RETURNING id"
)
_INS_HIST = (
    "INSERT INTO address_history (record_id, account, network_id, address, event, "
    "from_state, to_state, instance, host, physical, generation, at) VALUES (:rid, "
    ":account, :nid, :logical, 'allocate', NULL, 'allocated', NULL, NULL, NULL, 1, :now)"
)
_PARAM = re.compile(r":(\w+)")


class _Slow(Exception):
    """The hot path cannot serve this allocation; the Session path will."""


class FastAllocator:
    """Allocate logical addresses of account networks on one dedicated connection."""

    def __init__(self, engine: Engine) -> None:
        dialect = engine.dialect.name
        if dialect not in ("sqlite", "postgresql"):
            raise ValueError(f"FastAllocator supports SQLite and PostgreSQL, not {dialect}")
        self._engine = engine
        self._pg = dialect == "postgresql"
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        # The dialect's own conversion (SQLite: its fixed text format, so comparisons agree).
        bind = UTCDateTime().dialect_impl(engine.dialect).bind_processor(engine.dialect)
        self._ts: Callable[[datetime], Any] = bind if bind is not None else (lambda v: v)
        self._sql = {k: self._text(v) for k, v in {
            "take": _TAKE, "lock": _LOCK_NET, "pop": _POP, "rec": _INS_REC, "hist": _INS_HIST,
        }.items()}
        self._lock = threading.Lock()
        self._proxy: Any = None
        self._dbapi: Any = None
        # (account, network) -> (network id, account) of networks whose cursor is at its
        # end: it never moves back, so they allocate from the free-list from then on.
        self._exhausted: dict[tuple[str, str], int] = {}

    def _text(self, sql: str) -> str:
        if self._pg:
            return _PARAM.sub(r"%(\1)s", sql)
        return sql.replace(" FOR UPDATE", "")

    # -- connection ------------------------------------------------------------------------

    def _conn(self) -> Any:
        if self._dbapi is None:
            proxy = self._engine.raw_connection()
            dbapi: Any = proxy.driver_connection
            if not self._pg and dbapi.isolation_level is not None:
                proxy.close()
                raise ValueError("a SQLite engine needs records.configure_sqlite() first")
            self._proxy, self._dbapi = proxy, dbapi
        return self._dbapi

    def _drop(self) -> None:
        """Forget a connection that failed (the pool discards it)."""
        proxy, self._proxy, self._dbapi = self._proxy, None, None
        if proxy is not None:
            with contextlib.suppress(Exception):  # already broken; nothing to release
                proxy.invalidate()

    def close(self) -> None:
        with self._lock:
            if self._proxy is not None:
                self._proxy.close()
            self._proxy = self._dbapi = None

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
            try:
                return self._fast(account, network, n, now)
            except _Slow:
                pass
        return self._slow(account, network, n, now)

    # -- internals ---------------------------------------------------------------------------

    def _fast(self, account: str, network: str, n: int, now: datetime) -> list[AddressRecord]:
        conn = self._conn()
        try:
            if not self._pg:
                conn.execute("BEGIN IMMEDIATE")
            cur = conn.cursor()
            ts = self._ts(now)
            out = [self._one(cur, account, network, now, ts) for _ in range(n)]
            conn.commit()
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

    def _one(
        self, cur: Any, account: str, network: str, now: datetime, ts: Any
    ) -> AddressRecord:
        key = (account, network)
        nid = self._exhausted.get(key)
        while nid is None:  # fresh addresses first, from the cursor
            cur.execute(self._sql["take"], {"account": account, "name": network})
            net = cur.fetchone()
            if net is None:
                raise _Slow  # cursor at its end (the Session path learns which), or none
            pool = pool_for(net[3], net[4], bool(net[5]), f"{net[1]}/{net[2]}")
            offset = net[6] - 1
            if net[6] >= net[7]:
                self._exhausted[key] = net[0]
            if offset in pool.reserved:
                nid = self._exhausted.get(key)
                continue
            got = self._insert(cur, account, net[0], str(pool.address_at(offset)), now, ts)
            if got is not None:
                return got
            nid = self._exhausted.get(key)  # taken by a specific request: skip it
        if self._pg:
            cur.execute(self._sql["lock"], {"nid": nid})
            if cur.fetchone() is None:
                self._exhausted.pop(key, None)
                raise _Slow
        while True:  # then the free-list, oldest first
            cur.execute(self._sql["pop"], {"nid": nid})
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
        params = {"account": account, "nid": nid, "logical": logical, "now": ts}
        cur.execute(self._sql["rec"], params)
        row = cur.fetchone()
        if row is None:
            return None  # the unique key is taken: never two records for one address
        params["rid"] = row[0]
        cur.execute(self._sql["hist"], params)
        return AddressRecord(
            id=int(row[0]), account=account, network_id=nid, logical=logical, physical=None,
            host=None, instance=None, state=State.ALLOCATED, generation=1, held_until=None,
            created_at=now, updated_at=now,
        )

    def _slow(self, account: str, network: str, n: int, now: datetime) -> list[AddressRecord]:
        s: Session
        with self._sessions() as s, s.begin():
            return [records.allocate(s, account=account, network=network, now=now)
                    for _ in range(n)]


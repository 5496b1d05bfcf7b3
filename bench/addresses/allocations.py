"""Allocations per second from a /24 and from a /8 pool: is allocation flat in pool size?

One allocation = one transaction: lock the network row, advance the cursor (or pop the
free-list), insert the record and one history row, commit. The same program runs on both
pools: allocate N times; once K addresses are held, release the oldest after each
allocation (untimed, hold-down 0). On the /24 (253 assignable) the cursor runs out after
253 and allocations come from the free-list; on the /8 they always come from the cursor.

Baseline in the same run: the floor of the store, a transaction inserting two rows of the
same shape without any allocation logic.

    .venv/bin/python bench/addresses/allocations.py [--n 3000] [--no-postgres]

Prints a markdown table (paste into docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

from sqlalchemy import Engine, Table, create_engine, insert, text
from sqlalchemy.orm import Session, sessionmaker

from edgevisor.network import records as rec
from edgevisor.store import network_models as nm
from edgevisor.store.base import Base
from edgevisor.testing.postgres import PostgresUnavailable, throwaway_postgres

KEEP = 200


def _engine(url: str) -> Engine:
    engine = create_engine(url)
    rec.configure_sqlite(engine)
    tables = [cast(Table, m.__table__) for m in (
        nm.Network, nm.PhysicalPool, nm.NetworkFreeAddress, nm.PhysicalFreeAddress,
        nm.AddressRecordRow, nm.AddressHistory, nm.HostApplied)]
    Base.metadata.create_all(engine, tables=tables)
    return engine


def _timed(n: int, op: Callable[[int], None], cpu: list[float]) -> list[float]:
    out = []
    for i in range(n):
        c, t = time.process_time(), time.perf_counter()
        op(i)
        out.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return out


class PoolRun:
    """Allocations from one network; ``step(n)`` continues where the last call stopped."""

    def __init__(self, sessions: sessionmaker[Session], account: str, cidr: str) -> None:
        self.sessions = sessions
        self.account = account
        self.held: deque[int] = deque()
        self.durations: list[float] = []
        self.cpu: list[float] = []
        with sessions.begin() as s:
            rec.create_network(s, account=account, name="bench", cidr=cidr)

    def step(self, n: int) -> None:
        for _ in range(n):
            c, t = time.process_time(), time.perf_counter()
            with self.sessions.begin() as s:
                r = rec.allocate(s, account=self.account, network="bench")
            self.durations.append(time.perf_counter() - t)
            self.cpu.append(time.process_time() - c)
            self.held.append(r.id)
            if len(self.held) > KEEP:
                with self.sessions.begin() as s:
                    rec.release(s, account=self.account, record=self.held.popleft(),
                                hold_down_s=0)


def run_floor(sessions: sessionmaker[Session], n: int, cpu: list[float]) -> list[float]:
    now = datetime.now(UTC)

    stmt = insert(cast(Table, nm.AddressHistory.__table__))

    def op(i: int) -> None:
        row = {"record_id": i, "account": "floor", "network_id": 0, "address": f"f{i}",
               "event": "allocate", "to_state": "allocated", "generation": 1, "at": now}
        with sessions.begin() as s:
            s.connection().execute(stmt, row)
            s.connection().execute(stmt, row)

    return _timed(n, op, cpu)


def _row(backend: str, what: str, d: list[float], cpu: list[float], ratio: str = "") -> str:
    q = statistics.quantiles(d, n=100)
    return (f"| {backend} | {what} | {len(d)} | {len(d) / sum(d):,.0f} | "
            f"{1 / statistics.median(d):,.0f} | {len(cpu) / sum(cpu):,.0f} | "
            f"{statistics.median(d) * 1e3:.3f} | {q[98] * 1e3:.3f} | {ratio} |")


def bench_backend(backend: str, url: str, n: int, rounds: int = 10) -> list[str]:
    engine = _engine(url)
    sessions = sessionmaker(engine, expire_on_commit=False)
    with engine.connect() as c:  # warm the connection and statement caches
        c.execute(text("SELECT 1"))
    PoolRun(sessions, "warmup", "10.250.0.0/24").step(300)
    # Interleave the three in rounds so a change of machine load hits all of them alike.
    p24 = PoolRun(sessions, "acme", "10.1.0.0/24")
    p8 = PoolRun(sessions, "globex", "10.0.0.0/8")
    floor: list[float] = []
    floor_cpu: list[float] = []
    chunk = max(1, n // rounds)
    for _ in range(rounds):
        floor += run_floor(sessions, chunk, floor_cpu)
        p24.step(chunk)
        p8.step(chunk)
    engine.dispose()
    d24, d8 = p24.durations, p8.durations
    r24, r8 = len(d24) / sum(d24), len(d8) / sum(d8)
    m24, m8 = statistics.median(d24), statistics.median(d8)
    return [
        _row(backend, "floor: 2-row insert txn", floor, floor_cpu),
        _row(backend, "allocate from /24", d24, p24.cpu),
        _row(backend, "allocate from /8", d8, p8.cpu,
             f"/8 ÷ /24 = {r8 / r24:.2f} (mean), {m24 / m8:.2f} (p50)"),
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=3000, help="allocations per pool")
    ap.add_argument("--no-postgres", action="store_true", help="SQLite only")
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgevisor-bench-") as tmp:
        rows += bench_backend("SQLite (WAL)", f"sqlite:///{Path(tmp) / 'bench.db'}", args.n)
    if not args.no_postgres:
        try:
            with throwaway_postgres(database="bench") as pg:
                rows += bench_backend("PostgreSQL 15", pg.url, args.n)
        except PostgresUnavailable as exc:
            print(f"PostgreSQL skipped: {exc}", file=sys.stderr)
    print(f"Allocations, one transaction each with one history row; {KEEP} held, "
          "the oldest released after each allocation once more are held.\n")
    print("per s: n / total wall time; 1/p50: per s at the median latency; per CPU-s: n / "
          "CPU time of this process (excludes waiting for a shared CPU; the server's CPU "
          "is not counted for PostgreSQL).\n")
    print("| backend | pool | allocations | per s | 1/p50 | per CPU-s | p50 ms | p99 ms | ratio |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Allocations per second from a /24 and from a /8 pool: is allocation flat in pool size?

One allocation = one transaction: advance the cursor (or pop the free-list), insert the
record and one history row, commit. Measured on the hot path
(:class:`~edgevisor.network.fast_alloc.FastAllocator`: one connection, prepared statements),
one allocation per transaction; also ``allocate_many(100)`` (one transaction per 100) and,
for reference, the Session path (:func:`edgevisor.network.records.allocate`). The same
program runs on both pools: allocate N times; once K addresses are held, release the
oldest (Session path) after each allocation (untimed, hold-down 0); "bursts of 100":
100 allocations back to back, then the releases (the Session work in between otherwise
evicts the hot path's CPU caches, which halves its rate). On the /24 (253
assignable) the cursor runs out after 253 and allocations come from the free-list; on the
/8 they always come from the cursor.

The releases are outside the timed region (an allocation's rate should not include an
unrelated release), but two of their effects land inside it: on SQLite, a commit on
*another* connection makes the allocator's connection discard its page cache (so the next
allocation reads its pages again), and the release's Python work evicts the CPU caches.
Both are measured: "releases on another connection" (a Session from the engine's pool, as
an unrelated API request would) and "releases on its connection"
(:meth:`~edgevisor.network.fast_alloc.FastAllocator.session`, as a controller that routes
its address writes through the allocator would).

Baselines in the same run: the floor of the store, a transaction inserting two rows of the
same shape without any allocation logic, through a Session and on a raw connection. With
``--baseline-rev REV`` also the hot path as it is in git revision REV (e.g. ``HEAD``), on
the /24 and /8 pools, interleaved in the same rounds: a before/after from the same minutes.

    .venv/bin/python bench/addresses/allocations.py [--n 3000] [--no-postgres]
        [--baseline-rev HEAD]

Prints a markdown table (paste into docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any, cast

from sqlalchemy import Engine, Table, create_engine, insert, text
from sqlalchemy.orm import Session, sessionmaker

from edgevisor.network import records as rec
from edgevisor.network.fast_alloc import FastAllocator
from edgevisor.store import network_models as nm
from edgevisor.store.base import Base
from edgevisor.testing.postgres import PostgresUnavailable, throwaway_postgres

KEEP = 200
REPO = Path(__file__).resolve().parents[2]


def baseline_allocator(rev: str) -> Any:
    """The ``FastAllocator`` class of ``fast_alloc.py`` as it is in git revision ``rev``."""
    src = subprocess.run(
        ["git", "-C", str(REPO), "show", f"{rev}:src/edgevisor/network/fast_alloc.py"],
        capture_output=True, text=True, check=True,
    ).stdout
    mod = ModuleType(f"fast_alloc_at_{rev}")
    exec(compile(src, f"fast_alloc.py@{rev}", "exec"), mod.__dict__)  # our own file, at REV
    return mod.FastAllocator


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

    def __init__(
        self, sessions: sessionmaker[Session], account: str, cidr: str,
        fast: FastAllocator | None = None, batch: int = 0, burst: int = 0,
        release_on_fast: bool = False,
    ) -> None:
        self.sessions = sessions
        self.account = account
        self.fast = fast
        self.batch = batch
        self.burst = burst  # release only after this many allocations in a row
        self.release_on_fast = release_on_fast  # release on the allocator's connection
        self.held: deque[int] = deque()
        self.durations: list[float] = []
        self.cpu: list[float] = []
        with sessions.begin() as s:
            rec.create_network(s, account=account, name="bench", cidr=cidr)

    def step(self, n: int) -> None:
        if self.batch:
            self._step_batch(n)
            return
        for _ in range(n):
            c, t = time.process_time(), time.perf_counter()
            if self.fast is not None:
                r = self.fast.allocate(account=self.account, network="bench")
            else:
                with self.sessions.begin() as s:
                    r = rec.allocate(s, account=self.account, network="bench")
            self.durations.append(time.perf_counter() - t)
            self.cpu.append(time.process_time() - c)
            self.held.append(r.id)
            while len(self.held) > KEEP + self.burst:
                for _ in range(len(self.held) - KEEP if self.burst else 1):
                    self._release(self.held.popleft())

    def _release(self, record: int) -> None:
        if self.release_on_fast:
            assert self.fast is not None
            with self.fast.session() as s:
                rec.release(s, account=self.account, record=record, hold_down_s=0)
            return
        with self.sessions.begin() as s:
            rec.release(s, account=self.account, record=record, hold_down_s=0)

    def _step_batch(self, n: int) -> None:
        """``allocate_many``: one duration per address (the batch's time divided)."""
        assert self.fast is not None
        for _ in range(max(1, n // self.batch)):
            c, t = time.process_time(), time.perf_counter()
            got = self.fast.allocate_many(account=self.account, network="bench", n=self.batch)
            d, dc = time.perf_counter() - t, time.process_time() - c
            self.durations += [d / self.batch] * self.batch
            self.cpu += [dc / self.batch] * self.batch
            self.held.extend(r.id for r in got)


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


def run_raw_floor(engine: Engine, n: int, cpu: list[float]) -> list[float]:
    """The same two inserts on one raw DBAPI connection (the hot path's floor)."""
    proxy = engine.raw_connection()
    conn = proxy.driver_connection
    assert conn is not None
    now = "2026-01-01 00:00:00.000000"
    sql = ("INSERT INTO address_history (record_id, account, network_id, address, event, "
           "to_state, generation, at) VALUES (?, 'floor', 0, ?, 'allocate', 'allocated', 1, ?)")

    def op(i: int) -> None:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(sql, (i, f"r{i}", now))
        conn.execute(sql, (i, f"r{i}", now))
        conn.commit()

    try:
        return _timed(n, op, cpu)
    finally:
        proxy.close()


def _ratio(a: PoolRun, b: PoolRun) -> str:
    ra, rb = len(a.durations) / sum(a.durations), len(b.durations) / sum(b.durations)
    ma, mb = statistics.median(a.durations), statistics.median(b.durations)
    return f"/8 ÷ /24 = {rb / ra:.2f} (mean), {ma / mb:.2f} (p50)"


def _row(backend: str, what: str, d: list[float], cpu: list[float], ratio: str = "") -> str:
    q = statistics.quantiles(d, n=100)
    return (f"| {backend} | {what} | {len(d)} | {len(d) / sum(d):,.0f} | "
            f"{1 / statistics.median(d):,.0f} | {len(cpu) / sum(cpu):,.0f} | "
            f"{statistics.median(d) * 1e3:.3f} | {q[98] * 1e3:.3f} | {ratio} |")


def bench_backend(
    backend: str, url: str, n: int, rounds: int = 10, baseline: tuple[str, Any] | None = None
) -> list[str]:
    engine = _engine(url)
    sessions = sessionmaker(engine, expire_on_commit=False)
    fast = FastAllocator(engine)
    old = baseline[1](engine) if baseline else None
    with engine.connect() as c:  # warm the connection and statement caches
        c.execute(text("SELECT 1"))
    PoolRun(sessions, "warmup", "10.250.0.0/24", fast).step(300)
    PoolRun(sessions, "warmup2", "10.250.0.0/24").step(100)
    # Interleave all of them in rounds so a change of machine load hits them alike.
    p24 = PoolRun(sessions, "acme", "10.1.0.0/24", fast)
    p8 = PoolRun(sessions, "globex", "10.0.0.0/8", fast)
    many = PoolRun(sessions, "initech", "10.0.0.0/8", fast, batch=100)
    burst = PoolRun(sessions, "hooli", "10.0.0.0/8", fast, burst=100)
    slow = PoolRun(sessions, "umbrella", "10.0.0.0/8")
    own24 = PoolRun(sessions, "cyberdyne", "10.1.0.0/24", fast, release_on_fast=True)
    own8 = PoolRun(sessions, "tyrell", "10.0.0.0/8", fast, release_on_fast=True)
    olds = [PoolRun(sessions, "stark", "10.1.0.0/24", old),
            PoolRun(sessions, "wayne", "10.0.0.0/8", old)] if old else []  # fmt: skip
    floor: list[float] = []
    floor_cpu: list[float] = []
    raw: list[float] = []
    raw_cpu: list[float] = []
    chunk = max(1, n // rounds)
    for _ in range(rounds):
        floor += run_floor(sessions, chunk // 3, floor_cpu)
        if backend.startswith("SQLite"):
            raw += run_raw_floor(engine, chunk, raw_cpu)
        p24.step(chunk)
        p8.step(chunk)
        own24.step(chunk)
        own8.step(chunk)
        for o in olds:
            o.step(chunk)
        many.step(chunk)
        burst.step(chunk)
        slow.step(chunk // 3)
    fast.close()
    if old is not None:
        old.close()
    engine.dispose()
    d24, d8 = p24.durations, p8.durations
    r24, r8 = len(d24) / sum(d24), len(d8) / sum(d8)
    m24, m8 = statistics.median(d24), statistics.median(d8)
    rows = [_row(backend, "floor: 2-row insert txn, Session", floor, floor_cpu)]
    if raw:
        rows.append(_row(backend, "floor: 2-row insert txn, raw connection", raw, raw_cpu))
    if baseline and olds:
        rev = baseline[0]
        for o, pool, p in ((olds[0], "/24", p24), (olds[1], "/8", p8)):
            wall = sum(o.durations) / sum(p.durations)
            cpu = sum(o.cpu) / sum(p.cpu)
            med = statistics.median(o.durations) / statistics.median(p.durations)
            rows.append(_row(backend, f"allocate from {pool} (hot path at {rev})", o.durations,
                             o.cpu, f"now ÷ {rev} = {wall:.2f} (per s), {med:.2f} (1/p50), "
                             f"{cpu:.2f} (per CPU-s)"))  # fmt: skip
    return [
        *rows,
        _row(backend, "allocate from /24 (hot path, 1 per txn; releases on another "
             "connection)", d24, p24.cpu),
        _row(backend, "allocate from /8 (hot path, 1 per txn; releases on another "
             "connection)", d8, p8.cpu,
             f"/8 ÷ /24 = {r8 / r24:.2f} (mean), {m24 / m8:.2f} (p50)"),
        _row(backend, "allocate from /24 (hot path, 1 per txn; releases on its connection)",
             own24.durations, own24.cpu),
        _row(backend, "allocate from /8 (hot path, 1 per txn; releases on its connection)",
             own8.durations, own8.cpu, _ratio(own24, own8)),
        _row(backend, "allocate from /8 (hot path, 1 per txn, bursts of 100)", burst.durations,
             burst.cpu),
        _row(backend, "allocate_many(100) from /8, per address", many.durations, many.cpu),
        _row(backend, "allocate from /8 (Session path, 1 per txn)", slow.durations, slow.cpu),
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=3000, help="allocations per pool")
    ap.add_argument("--no-postgres", action="store_true", help="SQLite only")
    ap.add_argument("--baseline-rev", metavar="REV",
                    help="also run the hot path of this git revision (before/after)")
    args = ap.parse_args(argv)
    base = (args.baseline_rev, baseline_allocator(args.baseline_rev)) if args.baseline_rev \
        else None  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgevisor-bench-") as tmp:
        rows += bench_backend("SQLite (WAL)", f"sqlite:///{Path(tmp) / 'bench.db'}", args.n,
                              baseline=base)  # fmt: skip
    if not args.no_postgres:
        try:
            with throwaway_postgres(database="bench") as pg:
                rows += bench_backend("PostgreSQL 15", pg.url, args.n, baseline=base)
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

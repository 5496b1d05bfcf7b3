"""Many processes allocating from one network at once never get one address twice.

8 processes x 200 allocations (each its own transaction), plus every process racing for
the same handful of specific addresses; and processes churning a small pool (allocate,
release with no hold-down) so the free-list is contended. On SQLite (WAL) and PostgreSQL.
"""

from __future__ import annotations

import multiprocessing as mp
import traceback
from datetime import UTC, datetime
from multiprocessing.synchronize import Barrier

from sqlalchemy import Engine, create_engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from edgevisor.errors import Conflict
from edgevisor.network import records as rec
from edgevisor.network.ipam import PoolExhausted
from edgevisor.store.network_models import AddressHistory, AddressRecordRow

PROCS = 8
EACH = 200
CONTESTED = [f"10.60.{200 + i}.{i + 10}" for i in range(5)]


def _worker(url: str, barrier: Barrier, out: mp.Queue) -> None:  # type: ignore[type-arg]
    try:
        engine = create_engine(url)
        rec.configure_sqlite(engine)
        sessions = sessionmaker(engine)
        got: list[str] = []
        won: list[str] = []
        barrier.wait(timeout=120)
        for i in range(EACH):
            with sessions.begin() as s:
                got.append(rec.allocate(s, account="acme", network="lan").logical)
            if i % 40 == 0:
                addr = CONTESTED[i // 40]
                try:
                    with sessions.begin() as s:
                        rec.allocate(s, account="acme", network="lan", address=addr)
                    won.append(addr)
                except Conflict:
                    pass
        engine.dispose()
        out.put(("ok", got, won))
    except BaseException:
        out.put(("error", traceback.format_exc(), []))


def _run_workers(target: object, url: str, n: int) -> list[tuple[str, object, list[str]]]:
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(n)
    out: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    procs = [ctx.Process(target=target, args=(url, barrier, out)) for _ in range(n)]
    for p in procs:
        p.start()
    results = []
    try:
        for _ in procs:
            results.append(out.get(timeout=240))
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()
    return results


def test_parallel_allocations_never_duplicate(
    store_engine: Engine, sessions: sessionmaker[Session], store_url: str
) -> None:
    with sessions.begin() as s:
        rec.create_network(s, account="acme", name="lan", cidr="10.60.0.0/16",
                           now=datetime.now(UTC))
    store_engine.dispose()  # no pooled connection may cross the fork
    results = _run_workers(_worker, store_url, PROCS)
    errors = [r[1] for r in results if r[0] != "ok"]
    assert not errors, errors[0]
    allocated = [a for r in results for a in r[1]]
    won = [a for r in results for a in r[2]]
    assert len(allocated) == PROCS * EACH
    assert len(set(allocated)) == len(allocated), "an address was handed out twice"
    # Each contested address (far above the cursor) went to exactly one process.
    assert sorted(won) == sorted(CONTESTED)
    assert set(won).isdisjoint(allocated)
    with sessions.begin() as s:
        in_db = s.execute(
            select(AddressRecordRow.logical).where(AddressRecordRow.account == "acme")
        ).scalars().all()
        history_rows = s.execute(select(func.count()).select_from(AddressHistory)).scalar_one()
    assert sorted(in_db) == sorted(allocated + won)
    assert history_rows == len(allocated) + len(won)


CHURN_PROCS = 4
CHURN_OPS = 120
CHURN_KEEP = 5


def _churn_worker(url: str, barrier: Barrier, out: mp.Queue) -> None:  # type: ignore[type-arg]
    try:
        engine = create_engine(url)
        rec.configure_sqlite(engine)
        sessions = sessionmaker(engine)
        mine: list[int] = []
        barrier.wait(timeout=120)
        for _ in range(CHURN_OPS):
            with sessions.begin() as s:
                mine.append(rec.allocate(s, account="acme", network="small").id)
            if len(mine) > CHURN_KEEP:
                with sessions.begin() as s:
                    rec.release(s, account="acme", record=mine.pop(0), hold_down_s=0)
        engine.dispose()
        out.put(("ok", None, []))
    except PoolExhausted as exc:
        out.put(("error", f"pool exhausted although at most {CHURN_PROCS * (CHURN_KEEP + 1)} "
                          f"are held: {exc}", []))
    except BaseException:
        out.put(("error", traceback.format_exc(), []))


def test_parallel_churn_on_a_small_pool_never_duplicates(
    store_engine: Engine, sessions: sessionmaker[Session], store_url: str
) -> None:
    """The history proves it: per address, allocate and release/expire strictly alternate."""
    with sessions.begin() as s:
        rec.create_network(s, account="acme", name="small", cidr="10.61.0.0/27")
    store_engine.dispose()
    results = _run_workers(_churn_worker, store_url, CHURN_PROCS)
    errors = [r[1] for r in results if r[0] != "ok"]
    assert not errors, errors[0]
    with sessions.begin() as s:
        events = s.execute(
            select(AddressHistory.address, AddressHistory.event)
            .where(AddressHistory.account == "acme").order_by(AddressHistory.id)
        ).all()
    live: set[str] = set()
    allocations = 0
    for address, ev in events:
        if ev == "allocate":
            assert address not in live, f"{address} allocated while already allocated"
            live.add(address)
            allocations += 1
        elif ev == "expire":
            assert address in live
            live.remove(address)
    assert allocations == CHURN_PROCS * CHURN_OPS
    assert len(live) == CHURN_PROCS * CHURN_KEEP
    # 29 assignable addresses, far more allocations: the free-list was in play.
    assert len({a for a, _ in events}) <= 29

"""The allocation hot path (:class:`FastAllocator`) keeps every guarantee of the Session path.

Same store, same constraints: no address twice under many processes (mixed with the
Session path and specific requests), exactly one history row per allocation in the same
transaction, all-or-nothing batches, and the Session path's answers wherever the hot path
hands over (exhausted pool, missing network, expired holds). On SQLite and PostgreSQL.
"""

from __future__ import annotations

import multiprocessing as mp
import traceback
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from multiprocessing.synchronize import Barrier

import pytest
from sqlalchemy import Engine, create_engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from edgevisor.errors import Conflict, NotFound
from edgevisor.network import records as rec
from edgevisor.network.fast_alloc import FastAllocator
from edgevisor.network.ipam import PoolExhausted
from edgevisor.network.lifecycle import Event, State
from edgevisor.store.network_models import AddressHistory, AddressRecordRow

PROCS = 4
EACH = 100
CONTESTED = [f"10.70.{200 + i}.{i + 10}" for i in range(EACH // 50)]
CHURN_OPS = 60


def _count(s: Session, model: type, account: str) -> int:
    return int(s.execute(select(func.count()).select_from(model)
                         .where(model.account == account)).scalar_one())  # type: ignore[attr-defined]


# --- single process ------------------------------------------------------------------------


def test_fast_path_allocates_like_the_session_path(
    store_engine: Engine, sessions: sessionmaker[Session]
) -> None:
    now = datetime(2026, 5, 1, 12, 0, 0, tzinfo=UTC)  # no microseconds: format edge case
    with sessions.begin() as s:
        rec.create_network(s, account="acme", name="lan", cidr="10.70.0.0/29")
    fast = FastAllocator(store_engine)
    try:
        got = [fast.allocate(account="acme", network="lan", now=now) for _ in range(5)]
        # /29: network, gateway (.1) and broadcast are reserved; cursor order.
        assert [r.logical for r in got] == [f"10.70.0.{i}" for i in range(2, 7)]
        assert all(r.state is State.ALLOCATED and r.generation == 1 for r in got)
        with sessions.begin() as s:
            for r in got:
                stored = rec.get_record(s, account="acme", record=r.id)
                assert stored == r  # same values, timestamps read back identical
            hist = rec.history(s, account="acme", address="10.70.0.2")
        assert [(h.event, h.from_state, h.to_state, h.generation, h.at) for h in hist] == [
            (Event.ALLOCATE, None, State.ALLOCATED, 1, now)]
        with pytest.raises(PoolExhausted) as exc:
            fast.allocate(account="acme", network="lan", now=now)
        assert exc.value.details["size"] == 8
        # A released address (hold-down 0) comes back from the free-list, oldest first.
        with sessions.begin() as s:
            rec.release(s, account="acme", record=got[3].id, hold_down_s=0, now=now)
            rec.release(s, account="acme", record=got[1].id, hold_down_s=0, now=now)
        assert fast.allocate(account="acme", network="lan", now=now).logical == "10.70.0.5"
        assert fast.allocate(account="acme", network="lan", now=now).logical == "10.70.0.3"
        # A hold that is over is ended by the Session path the hot path hands over to.
        with sessions.begin() as s:
            rec.release(s, account="acme", record=got[0].id, hold_down_s=60, now=now)
        with pytest.raises(PoolExhausted):
            fast.allocate(account="acme", network="lan", now=now)
        later = now + timedelta(seconds=61)
        assert fast.allocate(account="acme", network="lan", now=later).logical == "10.70.0.2"
        with sessions.begin() as s:
            assert _count(s, AddressHistory, "acme") == 5 + 2 * 2 + 2 + 2 + 1
    finally:
        fast.close()


def test_fast_path_skips_addresses_taken_by_specific_requests(
    store_engine: Engine, sessions: sessionmaker[Session]
) -> None:
    with sessions.begin() as s:
        rec.create_network(s, account="acme", name="lan", cidr="10.71.0.0/24")
        rec.allocate(s, account="acme", network="lan", address="10.71.0.3")
        rec.allocate(s, account="acme", network="lan", address="10.71.0.4")
    fast = FastAllocator(store_engine)
    try:
        got = [fast.allocate(account="acme", network="lan").logical for _ in range(3)]
        assert got == ["10.71.0.2", "10.71.0.5", "10.71.0.6"]
        with pytest.raises(NotFound):
            fast.allocate(account="acme", network="nope")
        with pytest.raises(NotFound):
            fast.allocate(account="other", network="lan")
    finally:
        fast.close()


def test_allocate_many_is_all_or_nothing(
    store_engine: Engine, sessions: sessionmaker[Session]
) -> None:
    with sessions.begin() as s:
        rec.create_network(s, account="acme", name="lan", cidr="10.72.0.0/28")  # 13
    fast = FastAllocator(store_engine)
    try:
        first = fast.allocate_many(account="acme", network="lan", n=10)
        assert len({r.logical for r in first}) == 10
        with pytest.raises(PoolExhausted):
            fast.allocate_many(account="acme", network="lan", n=4)
        with sessions.begin() as s:
            assert _count(s, AddressRecordRow, "acme") == 10
            assert _count(s, AddressHistory, "acme") == 10
        last = fast.allocate_many(account="acme", network="lan", n=3)
        assert {r.logical for r in last}.isdisjoint(r.logical for r in first)
        with pytest.raises(ValueError):
            fast.allocate_many(account="acme", network="lan", n=0)
    finally:
        fast.close()


def test_a_recreated_network_is_not_confused_with_the_old_one(
    store_engine: Engine, sessions: sessionmaker[Session]
) -> None:
    """The hot path remembers networks whose cursor is at its end, by name; a network
    deleted and created again under that name must get its own (fresh) cursor."""
    with sessions.begin() as s:
        rec.create_network(s, account="acme", name="lan", cidr="10.73.0.0/30")  # 1 address
    fast = FastAllocator(store_engine)
    try:
        r = fast.allocate(account="acme", network="lan")
        with sessions.begin() as s:
            rec.release(s, account="acme", record=r.id, hold_down_s=0)
        again = fast.allocate(account="acme", network="lan")  # from the free-list
        assert again.logical == r.logical
        with sessions.begin() as s:
            rec.release(s, account="acme", record=again.id, hold_down_s=0)
            rec.delete_network(s, account="acme", name="lan")
            rec.create_network(s, account="acme", name="lan", cidr="10.74.0.0/24")
        assert fast.allocate(account="acme", network="lan").logical == "10.74.0.2"
    finally:
        fast.close()


def test_session_runs_other_writes_on_the_allocators_connection(
    store_engine: Engine, sessions: sessionmaker[Session]
) -> None:
    """Releases through ``session()`` share the hot path's connection (and page cache);
    the block is one transaction; allocating inside it is refused, not a deadlock."""
    with sessions.begin() as s:
        rec.create_network(s, account="acme", name="lan", cidr="10.76.0.0/30")  # 1 address
    fast = FastAllocator(store_engine)
    try:
        r = fast.allocate(account="acme", network="lan")
        with fast.session() as s:
            assert s.connection().connection.driver_connection is fast._dbapi
            with pytest.raises(RuntimeError):
                fast.allocate(account="acme", network="lan")
            with pytest.raises(RuntimeError), fast.session():
                pass
        # An error inside the block rolls everything back: the address stays allocated.
        with pytest.raises(ZeroDivisionError), fast.session() as s:
            rec.release(s, account="acme", record=r.id, hold_down_s=0)
            1 / 0  # noqa: B018
        with sessions.begin() as s:
            assert rec.get_record(s, account="acme", record=r.id).state is State.ALLOCATED
        with fast.session() as s:
            rec.release(s, account="acme", record=r.id, hold_down_s=0)
        again = fast.allocate(account="acme", network="lan")  # from the free-list
        assert again.logical == r.logical and again.id != r.id
        with sessions.begin() as s:
            hist = rec.history(s, account="acme", address=r.logical)
        assert [h.event for h in hist] == [
            Event.ALLOCATE, Event.RELEASE, Event.EXPIRE, Event.ALLOCATE]
        # The Session path the hot path hands over to (here: exhausted) runs on the same
        # connection, under the same lock, and leaves it usable.
        with pytest.raises(PoolExhausted):
            fast.allocate(account="acme", network="lan")
        with fast.session() as s:
            rec.release(s, account="acme", record=again.id, hold_down_s=0)
        assert fast.allocate(account="acme", network="lan").logical == r.logical
    finally:
        fast.close()


# --- many processes --------------------------------------------------------------------------


def _worker(url: str, barrier: Barrier, out: mp.Queue) -> None:  # type: ignore[type-arg]
    try:
        engine = create_engine(url)
        rec.configure_sqlite(engine)
        sessions = sessionmaker(engine)
        fast = FastAllocator(engine)
        got: list[str] = []
        won: list[str] = []
        barrier.wait(timeout=120)
        for i in range(EACH):
            if i % 10 == 9:  # the Session path interleaved with the hot path
                with sessions.begin() as s:
                    got.append(rec.allocate(s, account="acme", network="lan").logical)
            elif i % 10 == 5:
                got += [r.logical for r in fast.allocate_many(account="acme", network="lan",
                                                              n=3)]
            else:
                got.append(fast.allocate(account="acme", network="lan").logical)
            if i % 50 == 0:
                addr = CONTESTED[i // 50]
                try:
                    with sessions.begin() as s:
                        rec.allocate(s, account="acme", network="lan", address=addr)
                    won.append(addr)
                except Conflict:
                    pass
        fast.close()
        engine.dispose()
        out.put(("ok", got, won))
    except BaseException:
        out.put(("error", traceback.format_exc(), []))


def _churn_worker(url: str, barrier: Barrier, out: mp.Queue) -> None:  # type: ignore[type-arg]
    try:
        engine = create_engine(url)
        rec.configure_sqlite(engine)
        sessions = sessionmaker(engine)
        fast = FastAllocator(engine)
        mine: list[int] = []
        barrier.wait(timeout=120)
        for i in range(CHURN_OPS):
            mine.append(fast.allocate(account="acme", network="small").id)
            if len(mine) > 5:
                # Releases on the allocator's own connection and on another one, mixed.
                with fast.session() if i % 2 else sessions.begin() as s:
                    rec.release(s, account="acme", record=mine.pop(0), hold_down_s=0)
        fast.close()
        engine.dispose()
        out.put(("ok", None, []))
    except BaseException:
        out.put(("error", traceback.format_exc(), []))


def _run_workers(
    target: Callable[..., None], url: str, n: int
) -> list[tuple[str, object, list[str]]]:
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


def test_parallel_fast_allocations_never_duplicate(
    store_engine: Engine, sessions: sessionmaker[Session], store_url: str
) -> None:
    with sessions.begin() as s:
        rec.create_network(s, account="acme", name="lan", cidr="10.70.0.0/16")
    store_engine.dispose()  # no pooled connection may cross the fork
    results = _run_workers(_worker, store_url, PROCS)
    errors = [r[1] for r in results if r[0] != "ok"]
    assert not errors, errors[0]
    allocated = [a for r in results for a in r[1]]  # type: ignore[attr-defined]
    won = [a for r in results for a in r[2]]
    assert len(allocated) == PROCS * (EACH + 2 * (EACH // 10))
    assert len(set(allocated)) == len(allocated), "an address was handed out twice"
    assert sorted(won) == sorted(CONTESTED)
    assert set(won).isdisjoint(allocated)
    with sessions.begin() as s:
        in_db = s.execute(select(AddressRecordRow.logical)
                          .where(AddressRecordRow.account == "acme")).scalars().all()
        hist = s.execute(select(AddressHistory.address, AddressHistory.event)
                         .where(AddressHistory.account == "acme")).all()
    assert sorted(in_db) == sorted(allocated + won)
    # Exactly one history row per allocation, naming the address allocated.
    assert sorted(a for a, _ in hist) == sorted(allocated + won)
    assert {e for _, e in hist} == {"allocate"}


def test_parallel_fast_churn_on_a_small_pool_never_duplicates(
    store_engine: Engine, sessions: sessionmaker[Session], store_url: str
) -> None:
    """The free-list pop under contention: per address, allocate and expire alternate."""
    with sessions.begin() as s:
        rec.create_network(s, account="acme", name="small", cidr="10.75.0.0/27")
    store_engine.dispose()
    results = _run_workers(_churn_worker, store_url, 4)
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
    assert allocations == 4 * CHURN_OPS
    assert len(live) == 4 * 5
    assert len({a for a, _ in events}) <= 29

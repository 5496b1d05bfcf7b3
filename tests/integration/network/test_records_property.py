"""The persisted allocator behaves like the pure one: random programs on SQLite.

Never one address twice; every freed address can come back; the pool is exhausted exactly
when every assignable address is taken.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, Table, create_engine, select
from sqlalchemy.orm import Session, sessionmaker

from edgevisor.errors import Conflict, RequestError
from edgevisor.network import records as rec
from edgevisor.network.ipam import AddressPool, PoolExhausted
from edgevisor.store import network_models as nm
from edgevisor.store.base import Base

_TABLES = [cast(Table, m.__table__) for m in (
    nm.Network, nm.PhysicalPool, nm.NetworkFreeAddress, nm.PhysicalFreeAddress,
    nm.AddressRecordRow, nm.AddressHistory, nm.HostApplied)]
_accounts = (f"acct{i}" for i in itertools.count())


@pytest.fixture(scope="module")
def sqlite_sessions(tmp_path_factory: pytest.TempPathFactory) -> Iterator[sessionmaker[Session]]:
    path: Path = tmp_path_factory.mktemp("ipam-prop") / "store.db"
    engine: Engine = create_engine(f"sqlite:///{path}")
    rec.configure_sqlite(engine)
    Base.metadata.create_all(engine, tables=_TABLES)
    try:
        yield sessionmaker(engine, expire_on_commit=False)
    finally:
        engine.dispose()


_ops = st.lists(
    st.one_of(
        st.tuples(st.just("any"), st.just(0)),
        st.tuples(st.just("specific"), st.integers(0, 31)),
        st.tuples(st.just("release"), st.integers(0, 1000)),
    ),
    max_size=60,
)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=_ops, cidr=st.sampled_from(["10.7.0.0/27", "fd00:7::/123"]))
def test_store_allocator_never_duplicates_and_returns_freed(
    sqlite_sessions: sessionmaker[Session], ops: list[tuple[str, int]], cidr: str
) -> None:
    account = next(_accounts)
    pool = AddressPool.create(cidr)
    with sqlite_sessions.begin() as s:
        rec.create_network(s, account=account, name="n", cidr=cidr)
    held: dict[str, int] = {}
    for op, arg in ops:
        if op == "any":
            try:
                with sqlite_sessions.begin() as s:
                    r = rec.allocate(s, account=account, network="n")
            except PoolExhausted:
                assert len(held) == pool.assignable
                continue
            assert r.logical not in held
            held[r.logical] = r.id
        elif op == "specific":
            addr = str(pool.address_at(arg))
            expected: type[Exception] | None = (
                RequestError if arg in pool.reserved else Conflict if addr in held else None
            )
            if expected is not None:
                with pytest.raises(expected), sqlite_sessions.begin() as s:
                    rec.allocate(s, account=account, network="n", address=addr)
            else:
                with sqlite_sessions.begin() as s:
                    r = rec.allocate(s, account=account, network="n", address=addr)
                assert r.logical == addr
                held[addr] = r.id
        elif held:
            addr = sorted(held)[arg % len(held)]
            with sqlite_sessions.begin() as s:
                rec.release(s, account=account, record=held.pop(addr), hold_down_s=0)
    rest: list[str] = []
    while True:
        try:
            with sqlite_sessions.begin() as s:
                rest.append(rec.allocate(s, account=account, network="n").logical)
        except PoolExhausted:
            break
    assert len(rest) == len(set(rest)) and set(rest).isdisjoint(held)
    everything = {str(pool.address_at(o)) for o in range(pool.size) if o not in pool.reserved}
    assert set(rest) | set(held) == everything


def test_ipv6_address_beyond_the_cursor_cap_returns_to_the_free_list(
    sqlite_sessions: sessionmaker[Session],
) -> None:
    account = next(_accounts)
    high = "fd00:8::ffff:ffff:ffff:fffe"
    with sqlite_sessions.begin() as s:
        rec.create_network(s, account=account, name="n", cidr="fd00:8::/64")
        r = rec.allocate(s, account=account, network="n", address=high)
        rec.release(s, account=account, record=r.id, hold_down_s=0)
        free = s.execute(
            select(nm.NetworkFreeAddress.address)
            .join(nm.Network, nm.Network.id == nm.NetworkFreeAddress.network_id)
            .where(nm.Network.account == account)
        ).scalars().all()
    assert free == [high]

"""Deleting an account takes its networks along (issue 4 leftover), never a held address.

Store level (SQLite and PostgreSQL): :func:`delete_account_networks` refuses while the
account holds an address and then changes nothing; otherwise it deletes the networks with
their free-lists, ends hold-downs early with one exact history row each, keeps the history,
and leaves other accounts alone; the hot path's caches do not resurrect a deleted network.
API level: ``DELETE /v1/accounts/{name}`` does the same inside the account deletion, and an
account created again under the name starts without networks.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from edgevisor import Client
from edgevisor.errors import Conflict, NotFound
from edgevisor.network import records as rec
from edgevisor.network.fast_alloc import FastAllocator
from edgevisor.network.lifecycle import Event, State
from edgevisor.network.pools import delete_account_networks
from edgevisor.store.network_models import (
    AddressHistory,
    AddressRecordRow,
    Network,
    NetworkFreeAddress,
)
from edgevisor.testing.controller import RunningController, running_controller

T0 = datetime(2026, 5, 1, 12, 0, 0, tzinfo=UTC)


def _rows(s: Session, model: type, **where: Any) -> int:
    stmt = select(func.count()).select_from(model)
    for k, v in where.items():
        stmt = stmt.where(getattr(model, k) == v)
    return int(s.execute(stmt).scalar_one())


def _state(s: Session) -> list[Any]:
    """Everything the network tables hold, to compare before and after a refusal."""
    out: list[Any] = []
    for model in (Network, NetworkFreeAddress, AddressRecordRow, AddressHistory):
        out.append(sorted(tuple(r) for r in s.execute(select(model.__table__))))
    return out


# --- store level ---------------------------------------------------------------------------


def test_refused_while_an_address_is_held_and_nothing_changes(
    sessions: sessionmaker[Session],
) -> None:
    with sessions.begin() as s:
        rec.create_physical_pool(s, host_group="g", cidr="10.250.0.0/24", now=T0)
        rec.create_network(s, account="acme", name="lan", cidr="10.80.0.0/24", now=T0)
        rec.create_network(s, account="acme", name="lab", cidr="10.81.0.0/24", now=T0)
        a = rec.allocate(s, account="acme", network="lan", now=T0)  # allocated
        b = rec.allocate(s, account="acme", network="lab", now=T0)
        rec.bind(s, account="acme", record=b.id, instance="i1", host="h1", host_group="g",
                 now=T0)  # fmt: skip
        c = rec.allocate(s, account="acme", network="lab", now=T0)
        rec.bind(s, account="acme", record=c.id, instance="i2", host="h1", host_group="g",
                 now=T0)  # fmt: skip
        rec.preserve(s, account="acme", record=c.id, now=T0)  # preserved
    holding = [a, b, c]  # allocated, bound, preserved: each blocks on its own
    while holding:
        with sessions.begin() as s:
            before = _state(s)
        with pytest.raises(Conflict) as exc, sessions.begin() as s:
            delete_account_networks(s, account="acme", now=T0)
        assert exc.value.details == {"addresses": sorted(r.logical for r in holding)}
        with sessions.begin() as s:
            assert _state(s) == before
            rec.release(s, account="acme", record=holding.pop(0).id, hold_down_s=0, now=T0)
    with sessions.begin() as s:
        assert delete_account_networks(s, account="acme", now=T0) == ["lab", "lan"]
        assert _rows(s, Network, account="acme") == 0


def test_networks_go_with_free_lists_and_holds_end_with_exact_history(
    sessions: sessionmaker[Session],
) -> None:
    with sessions.begin() as s:
        lan = rec.create_network(s, account="acme", name="lan", cidr="10.82.0.0/28", now=T0)
        other = rec.create_network(s, account="other", name="lan", cidr="10.82.0.0/28",
                                   now=T0)  # fmt: skip
        got = [rec.allocate(s, account="acme", network="lan", now=T0) for _ in range(4)]
        kept = rec.allocate(s, account="other", network="lan", now=T0)
        # Two back on the free-list, two in their hold-down (released, state held).
        rec.release(s, account="acme", record=got[0].id, hold_down_s=0, now=T0)
        rec.release(s, account="acme", record=got[1].id, hold_down_s=0, now=T0)
        rec.release(s, account="acme", record=got[2].id, hold_down_s=300, now=T0)
        rec.release(s, account="acme", record=got[3].id, hold_down_s=300, now=T0)
        assert _rows(s, NetworkFreeAddress, network_id=lan.id) == 2
    later = T0 + timedelta(seconds=5)  # within the hold-down
    with sessions.begin() as s:
        assert delete_account_networks(s, account="acme", now=later) == ["lan"]
    with sessions.begin() as s:
        assert _rows(s, Network, account="acme") == 0
        assert _rows(s, NetworkFreeAddress, network_id=lan.id) == 0
        assert _rows(s, AddressRecordRow, account="acme") == 0
        for r in got[2:]:  # each hold ended by exactly one transition, at the deletion
            hist = rec.history(s, account="acme", address=r.logical)
            assert [(h.event, h.from_state, h.to_state, h.generation, h.at)
                    for h in hist] == [
                (Event.ALLOCATE, None, State.ALLOCATED, 1, T0),
                (Event.RELEASE, State.ALLOCATED, State.HELD, 2, T0),
                (Event.ACCOUNT_DELETED, State.HELD, State.RELEASED, 3, later),
            ]
        for r in got[:2]:  # ended before: history untouched by the deletion
            assert [h.event for h in rec.history(s, account="acme", address=r.logical)] == [
                Event.ALLOCATE, Event.RELEASE, Event.EXPIRE]
        # The other account (same name, same CIDR) is untouched.
        assert rec.get_network(s, account="other", name="lan").id == other.id
        assert rec.get_record(s, account="other", record=kept.id) == kept
        # Nothing left: deleting again deletes nothing and is not an error.
        assert delete_account_networks(s, account="acme", now=later) == []


def test_the_hot_path_does_not_resurrect_a_deleted_network(
    store_engine: Engine, sessions: sessionmaker[Session]
) -> None:
    """The hot path caches networks by id and remembers exhausted cursors by name; after
    the account's networks are gone it says NotFound, and a network created again under
    the name gets a fresh cursor."""
    with sessions.begin() as s:
        rec.create_network(s, account="acme", name="lan", cidr="10.83.0.0/30", now=T0)
        rec.create_network(s, account="acme", name="big", cidr="10.84.0.0/24", now=T0)
    fast = FastAllocator(store_engine)
    try:
        got = [fast.allocate(account="acme", network="lan", now=T0),  # cursor at its end
               fast.allocate(account="acme", network="big", now=T0)]  # fmt: skip
        assert [r.logical for r in got] == ["10.83.0.2", "10.84.0.2"]
        with sessions.begin() as s:
            for r in got:
                rec.release(s, account="acme", record=r.id, hold_down_s=0, now=T0)
            assert delete_account_networks(s, account="acme", now=T0) == ["big", "lan"]
        for name in ("lan", "big"):
            with pytest.raises(NotFound):
                fast.allocate(account="acme", network=name, now=T0)
        with sessions.begin() as s:
            rec.create_network(s, account="acme", name="big", cidr="10.85.0.0/24", now=T0)
            rec.create_network(s, account="acme", name="lan", cidr="10.86.0.0/30", now=T0)
        assert fast.allocate(account="acme", network="big", now=T0).logical == "10.85.0.2"
        assert fast.allocate(account="acme", network="lan", now=T0).logical == "10.86.0.2"
    finally:
        fast.close()


# --- API level -----------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def ctl(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RunningController]:
    overrides: dict[str, Any] = {"network.hold_down_s": 300.0}
    if request.param == "postgres":
        overrides["controller.store_url"] = request.getfixturevalue(
            "postgres_server").create_database()
    with running_controller(tmp_path / "ctl", overrides) as c:
        yield c


def test_account_delete_takes_its_networks_and_keeps_history(ctl: RunningController) -> None:
    with Client(ctl.url, ctl.admin_token) as admin:
        admin.create_account("acme")
        admin.create_account("other")
        with Client(ctl.url, admin.create_token(account="acme").secret) as acme:
            acme.create_network("net", "10.0.0.0/24")
            acme.create_network("lab", "10.9.0.0/24")
            r = acme.allocate_address("net")
            acme.allocate_address("lab")
            held = acme.allocate_address("net")
        admin.create_network("net", "10.0.0.0/24", account="other")
        admin.allocate_address("net", account="other")
        before = ([n.model_dump() for n in admin.list_networks("acme")],
                  [a.model_dump() for a in admin.list_addresses("acme")])
        with pytest.raises(Conflict) as exc:  # still holds three addresses
            admin.delete_account("acme")
        assert exc.value.details == {"addresses": ["10.0.0.2", "10.0.0.3", "10.9.0.2"]}
        assert ([n.model_dump() for n in admin.list_networks("acme")],
                [a.model_dump() for a in admin.list_addresses("acme")]) == before
        for a in admin.list_addresses("acme"):  # released; `held` stays in its hold-down
            admin.release_address(a.id, account="acme",
                                  hold_down_s=300 if a.id == held.id else 0)  # fmt: skip
        assert [a.state for a in admin.list_addresses("acme")] == ["held"]
        admin.delete_account("acme")

        st = ctl.state
        assert st is not None
        with st.store.session() as s:
            assert _rows(s, Network, account="acme") == 0
            assert _rows(s, AddressRecordRow, account="acme") == 0
            hist = rec.history(s, account="acme", address=held.logical)
            assert [(h.event.value, h.to_state.value) for h in hist] == [
                ("allocate", "allocated"), ("release", "held"),
                ("account_deleted", "released")]
            assert rec.history(s, account="acme", address=r.logical)  # kept as well
        # The other account is untouched; a new "acme" starts without networks.
        assert [n.name for n in admin.list_networks("other")] == ["net"]
        assert len(admin.list_addresses("other")) == 1
        admin.create_account("acme")
        assert admin.list_networks("acme") == []
        admin.create_network("net", "10.0.0.0/24", account="acme")
        assert admin.allocate_address("net", account="acme").logical == "10.0.0.2"

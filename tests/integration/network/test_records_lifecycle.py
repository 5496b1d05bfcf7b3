"""Address records in the store: lifecycle, history, errors, host reports, leak collection.

Every test runs on SQLite (WAL file) and on a throwaway PostgreSQL (``store_url``).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, select, text
from sqlalchemy.orm import Session, sessionmaker

from edgevisor.errors import (
    AlreadyExists,
    Conflict,
    Forbidden,
    NotFound,
    RequestError,
    ResourceExhausted,
)
from edgevisor.network import host_reports as hr
from edgevisor.network import records as rec
from edgevisor.network.ipam import IpamSettings, PoolExhausted
from edgevisor.network.lifecycle import Event, State
from edgevisor.store.network_models import AddressHistory

T0 = datetime(2026, 11, 27, 14, 0, tzinfo=UTC)
S = sessionmaker[Session]


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


@pytest.fixture()
def fleet(sessions: S) -> S:
    """Account ``acme`` with network ``lan`` 10.20.0.0/24 and ``globex`` with the same
    CIDR; physical pools for host groups ``g1`` (v4 + v6) and ``g2`` (v4)."""
    with sessions.begin() as s:
        rec.create_network(s, account="acme", name="lan", cidr="10.20.0.0/24", now=T0)
        rec.create_network(s, account="globex", name="lan", cidr="10.20.0.0/24", now=T0)
        rec.create_network(s, account="acme", name="v6", cidr="fd00:ac::/64", now=T0)
        rec.create_physical_pool(s, host_group="g1", cidr="172.16.0.0/24", now=T0)
        rec.create_physical_pool(s, host_group="g1", cidr="fd99:1::/64", now=T0)
        rec.create_physical_pool(s, host_group="g2", cidr="172.17.0.0/24", now=T0)
    return sessions


def snapshot(engine: Engine) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every network table, to prove a refused operation changed nothing."""
    out = {}
    with engine.connect() as c:
        for t in ("networks", "physical_pools", "network_free_addresses",
                  "physical_free_addresses", "address_records", "address_history",
                  "address_host_applied"):
            out[t] = [tuple(r) for r in c.execute(text(f"SELECT * FROM {t} ORDER BY 1"))]
    return out


def steps(s: Session, account: str, address: str) -> list[tuple[Any, ...]]:
    return [
        (h.event, h.from_state, h.to_state, h.instance, h.host, h.physical, h.generation)
        for h in rec.history(s, account=account, address=address)
    ]


def test_full_lifecycle_appends_exact_history(fleet: S) -> None:
    with fleet.begin() as s:
        a = rec.allocate(s, account="acme", network="lan", now=at(1))
    assert (a.logical, a.state, a.generation) == ("10.20.0.2", State.ALLOCATED, 1)
    with fleet.begin() as s:
        b = rec.bind(s, account="acme", record="10.20.0.2", instance="i-1", host="h1",
                     host_group="g1", now=at(2))
    assert (b.state, b.host, b.physical, b.generation) == (State.BOUND, "h1", "172.16.0.1", 2)
    with fleet.begin() as s:
        p = rec.preserve(s, account="acme", record=a.id, now=at(3))
    assert (p.state, p.host, p.physical, p.instance) == (State.PRESERVED, None, None, None)
    with fleet.begin() as s:
        c = rec.claim(s, account="acme", record="10.20.0.2", instance="i-2", host="h2",
                      host_group="g2", now=at(4))
    assert (c.state, c.instance, c.host, c.physical) == (State.BOUND, "i-2", "h2", "172.17.0.1")
    with fleet.begin() as s:
        m = rec.move(s, record=a.id, host="h1", host_group="g1", expected_generation=4,
                     now=at(5))
    # The physical freed by preserve comes back from g1's free-list only after the cursor.
    assert (m.host, m.physical, m.generation) == ("h1", "172.16.0.2", 5)
    with fleet.begin() as s:
        r = rec.release(s, account="acme", record=a.id, hold_down_s=60, now=at(6))
    assert (r.state, r.held_until) == (State.HELD, at(66))
    with fleet.begin() as s:
        assert rec.expire_holds(s, now=at(65)) == 0
        assert rec.expire_holds(s, now=at(66)) == 1
        with pytest.raises(NotFound):
            rec.get_record(s, account="acme", record="10.20.0.2")
        assert steps(s, "acme", "10.20.0.2") == [
            ("allocate", None, "allocated", None, None, None, 1),
            ("bind", "allocated", "bound", "i-1", "h1", "172.16.0.1", 2),
            ("preserve", "bound", "preserved", None, None, None, 3),
            ("claim", "preserved", "bound", "i-2", "h2", "172.17.0.1", 4),
            ("move", "bound", "bound", "i-2", "h1", "172.16.0.2", 5),
            ("release", "bound", "held", None, None, None, 6),
            ("expire", "held", "released", None, None, None, 7),
        ]
        assert [h.at for h in rec.history(s, account="acme", address="10.20.0.2")] == [
            at(1), at(2), at(3), at(4), at(5), at(6), at(66),
        ]
        # The other account's identical address has its own (empty) history.
        assert rec.history(s, account="globex", address="10.20.0.2") == []


def test_history_outlives_the_record_and_shows_every_life(fleet: S) -> None:
    with fleet.begin() as s:
        a = rec.allocate(s, account="acme", network="lan", address="10.20.0.50", now=at(1))
        rec.release(s, account="acme", record=a.id, hold_down_s=0, now=at(2))
        b = rec.allocate(s, account="acme", network="lan", address="10.20.0.50", now=at(3))
    assert b.id != a.id
    with fleet.begin() as s:
        lives = [(h.record_id, h.event) for h in
                 rec.history(s, account="acme", address="10.20.0.50")]
    assert lives == [(a.id, Event.ALLOCATE), (a.id, Event.RELEASE), (a.id, Event.EXPIRE),
                     (b.id, Event.ALLOCATE)]


def test_other_account_cannot_claim_and_nothing_changes(fleet: S, store_engine: Engine) -> None:
    with fleet.begin() as s:
        a = rec.allocate(s, account="acme", network="lan", now=at(1))
        rec.bind(s, account="acme", record=a.id, instance="i-1", host="h1", host_group="g1",
                 now=at(2))
        rec.preserve(s, account="acme", record=a.id, now=at(3))
    before = snapshot(store_engine)
    with pytest.raises(Forbidden, match="not owned by account 'globex'"), fleet.begin() as s:
        rec.claim(s, account="globex", record=a.id, instance="g-1", host="h1",
                  host_group="g1", now=at(4))
    # By address, globex names its own (unallocated) 10.20.0.2: not found, not acme's.
    with pytest.raises(NotFound), fleet.begin() as s:
        rec.claim(s, account="globex", record=a.logical, instance="g-1", host="h1",
                  host_group="g1", now=at(4))
    assert snapshot(store_engine) == before


def test_refused_operations_change_nothing(fleet: S, store_engine: Engine) -> None:
    with fleet.begin() as s:
        a = rec.allocate(s, account="acme", network="lan", now=at(1))
        rec.bind(s, account="acme", record=a.id, instance="i-1", host="h1", host_group="g1",
                 now=at(2))
        other = rec.allocate(s, account="acme", network="lan", now=at(3))
    before = snapshot(store_engine)
    refused: list[tuple[type[Exception], str, Any]] = [
        (Conflict, "already bound", lambda s: rec.bind(
            s, account="acme", record=a.id, instance="i-9", host="h1", host_group="g1")),
        (Conflict, "only preserved", lambda s: rec.claim(
            s, account="acme", record=a.id, instance="i-9", host="h1", host_group="g1")),
        (Conflict, "already has address", lambda s: rec.bind(
            s, account="acme", record=other.id, instance="i-1", host="h2", host_group="g2")),
        (NotFound, "no IPv4 physical pool", lambda s: rec.bind(
            s, account="acme", record=other.id, instance="i-9", host="h3", host_group="g9")),
        (Conflict, "generation 2, not 1", lambda s: rec.move(
            s, record=a.id, host="h2", host_group="g2", expected_generation=1)),
        (Conflict, "already on host", lambda s: rec.move(
            s, record=a.id, host="h1", host_group="g1")),
        (Conflict, "not bound", lambda s: rec.preserve(s, account="acme", record=other.id)),
        (Conflict, "already taken", lambda s: rec.allocate(
            s, account="acme", network="lan", address=a.logical)),
        (RequestError, "outside network", lambda s: rec.allocate(
            s, account="acme", network="lan", address="10.21.0.1")),
        (RequestError, "gateway", lambda s: rec.allocate(
            s, account="acme", network="lan", address="10.20.0.1")),
        (RequestError, "reserved", lambda s: rec.allocate(
            s, account="acme", network="lan", address="10.20.0.255")),
        (NotFound, "no network named 'wan'", lambda s: rec.allocate(
            s, account="acme", network="wan")),
        (NotFound, "not found", lambda s: rec.release(
            s, account="acme", record="10.20.0.77", hold_down_s=0)),
        (RequestError, "invalid address", lambda s: rec.release(
            s, account="acme", record="10.20.0.777", hold_down_s=0)),
        (Conflict, "overlaps", lambda s: rec.create_network(
            s, account="acme", name="lan2", cidr="10.20.0.128/25")),
        (AlreadyExists, "already has a network named", lambda s: rec.create_network(
            s, account="acme", name="lan", cidr="10.30.0.0/24")),
        (RequestError, "too large", lambda s: rec.create_network(
            s, account="acme", name="big", cidr="10.0.0.0/7")),
        (RequestError, "too small", lambda s: rec.create_network(
            s, account="acme", name="tiny", cidr="10.40.0.0/31")),
        (RequestError, "invalid CIDR", lambda s: rec.create_network(
            s, account="acme", name="bad", cidr="10.40.0.1/24")),
        (Conflict, "overlaps", lambda s: rec.create_physical_pool(
            s, host_group="g3", cidr="172.16.0.128/25")),
        (Conflict, "still has 2 address", lambda s: rec.delete_network(
            s, account="acme", name="lan")),
    ]
    for exc, message, op in refused:
        with pytest.raises(exc, match=message), fleet.begin() as s:
            op(s)
        assert snapshot(store_engine) == before, message


def test_double_release_is_refused(fleet: S) -> None:
    with fleet.begin() as s:
        a = rec.allocate(s, account="acme", network="lan", now=at(1))
        rec.release(s, account="acme", record=a.id, hold_down_s=30, now=at(2))
    with pytest.raises(Conflict, match="already released"), fleet.begin() as s:
        rec.release(s, account="acme", record=a.id, hold_down_s=30, now=at(3))
    with fleet.begin() as s:
        rec.expire_holds(s, now=at(40))
    with pytest.raises(NotFound, match="released"), fleet.begin() as s:
        rec.release(s, account="acme", record=a.id, hold_down_s=30, now=at(41))


def test_exhausted_pool_names_pool_and_size_then_hold_down_returns_addresses(
    fleet: S,
) -> None:
    with fleet.begin() as s:
        rec.create_network(s, account="acme", name="small", cidr="10.50.0.0/29", now=T0)
        got = [rec.allocate(s, account="acme", network="small", now=at(1)) for _ in range(5)]
    assert [g.logical for g in got] == [f"10.50.0.{i}" for i in range(2, 7)]
    with pytest.raises(PoolExhausted) as err, fleet.begin() as s:
        rec.allocate(s, account="acme", network="small", now=at(2))
    assert isinstance(err.value, ResourceExhausted)
    assert err.value.details["pool"] == "acme/small"
    assert err.value.details["size"] == 8 and err.value.details["assignable"] == 5
    assert "10.50.0.0/29" in err.value.message and "5 in use or held" in err.value.message
    with fleet.begin() as s:
        rec.release(s, account="acme", record=got[2].id, hold_down_s=100, now=at(3))
        rec.release(s, account="acme", record=got[0].id, hold_down_s=50, now=at(4))
    # Held addresses are not reused during their hold-down...
    with pytest.raises(PoolExhausted), fleet.begin() as s:
        rec.allocate(s, account="acme", network="small", now=at(53))
    with pytest.raises(Conflict, match="state held until"), fleet.begin() as s:
        rec.allocate(s, account="acme", network="small", address="10.50.0.2", now=at(53))
    # ...and come back, earliest hold end first, once it is over (no sweep needed).
    with fleet.begin() as s:
        assert rec.allocate(s, account="acme", network="small", now=at(54)).logical == (
            "10.50.0.2"
        )
    with fleet.begin() as s:
        assert rec.allocate(s, account="acme", network="small", address="10.50.0.4",
                            now=at(103)).logical == "10.50.0.4"


def test_overlap_across_accounts_and_ipv6(fleet: S) -> None:
    with fleet.begin() as s:
        x = rec.allocate(s, account="acme", network="lan", address="10.20.0.9", now=at(1))
        y = rec.allocate(s, account="globex", network="lan", address="10.20.0.9", now=at(1))
        v6 = rec.allocate(s, account="acme", network="v6", now=at(1))
        b6 = rec.bind(s, account="acme", record=v6.id, instance="i-6", host="h1",
                      host_group="g1", now=at(2))
    assert x.id != y.id and x.logical == y.logical
    assert v6.logical == "fd00:ac::2" and b6.physical == "fd99:1::1"
    with fleet.begin() as s:
        assert rec.get_record(s, account="globex", record="10.20.0.9").id == y.id
        assert [n.name for n in rec.list_networks(s, account="acme")] == ["lan", "v6"]
        assert rec.get_network(s, account="acme", name="v6").size == 2**64


def test_records_show_applied_generation_per_host_and_drift(fleet: S) -> None:
    with fleet.begin() as s:
        a = rec.allocate(s, account="acme", network="lan", now=at(1))
        rec.bind(s, account="acme", record=a.id, instance="i-1", host="h1", host_group="g1",
                 now=at(1))
        b = rec.allocate(s, account="acme", network="lan", now=at(1))
        rec.bind(s, account="acme", record=b.id, instance="i-2", host="h2", host_group="g2",
                 now=at(1))
        g = rec.allocate(s, account="globex", network="lan", now=at(1))
        rec.bind(s, account="globex", record=g.id, instance="g-1", host="h3",
                 host_group="g2", now=at(1))
    with fleet.begin() as s:
        assert [r.logical for r in hr.records_for_host(s, host="h1")] == [a.logical, b.logical]
        assert [r.id for r in hr.records_for_host(s, host="h3")] == [g.id]
        assert hr.records_for_host(s, host="nowhere") == []
        hr.report_applied(s, host="h1", reports=[hr.AppliedReport(a.id, 2),
                                                  hr.AppliedReport(b.id, 2)], now=at(2))
        hr.report_applied(s, host="h2", reports=[hr.AppliedReport(a.id, 2),
                                                  hr.AppliedReport(b.id, 1)], now=at(2))
    with fleet.begin() as s:
        status = {r.record.id: r for r in hr.list_records(s, account="acme")}
    assert status[a.id].needed_by == ("h1", "h2") and status[a.id].drift == ()
    assert status[b.id].drift == ("h2",)
    assert [(x.host, x.generation) for x in status[b.id].applied] == [("h1", 2), ("h2", 1)]
    # A failed apply keeps the last good generation and shows the error.
    with fleet.begin() as s:
        hr.report_applied(s, host="h2", reports=[hr.AppliedReport(b.id, 2, "nft: EPERM")],
                           now=at(3))
        st = {r.record.id: r for r in hr.list_records(s, host="h2")}[b.id]
    assert [(x.host, x.generation, x.error) for x in st.applied] == [
        ("h1", 2, None), ("h2", 1, "nft: EPERM"),
    ]
    with pytest.raises(RequestError, match="only at 2"), fleet.begin() as s:
        hr.report_applied(s, host="h2", reports=[hr.AppliedReport(b.id, 3)])
    # A move bumps the generation: both hosts drift until they report it.
    with fleet.begin() as s:
        rec.move(s, record=b.id, host="h1", host_group="g1", now=at(4))
        st = {r.record.id: r for r in hr.list_records(s, account="acme")}[b.id]
    assert st.record.generation == 3 and st.needed_by == ("h1",) and st.drift == ("h1",)


def test_leak_collection_needs_grace_and_unchanged_generation(fleet: S) -> None:
    with fleet.begin() as s:
        ids = []
        for i in range(3):
            r = rec.allocate(s, account="acme", network="lan", now=at(0))
            rec.bind(s, account="acme", record=r.id, instance=f"i-{i}", host="h1",
                     host_group="g1", now=at(0))
            ids.append(r.id)
    with fleet.begin() as s:
        suspects = hr.report_instances(s, host="h1", instances=["i-0"], now=at(10))
    assert sorted(x.instance or "" for x in suspects) == ["i-1", "i-2"]
    with fleet.begin() as s:
        # i-2 turns up again (a slow start): no longer a suspect.
        hr.report_instances(s, host="h1", instances=["i-0", "i-2"], now=at(20))
        # i-1's record is moved meanwhile (a migration): its generation changed.
        rec.move(s, record=ids[1], host="h2", host_group="g2", now=at(30))
        assert hr.collect_leaks(s, grace_s=5, hold_down_s=0, now=at(1000)) == []
    with fleet.begin() as s:
        hr.report_instances(s, host="h2", instances=[], now=at(100))
        assert hr.collect_leaks(s, grace_s=60, hold_down_s=10, now=at(159)) == []
        leaked = hr.collect_leaks(s, grace_s=60, hold_down_s=10, now=at(160))
    assert [(x.id, x.state, x.held_until) for x in leaked] == [(ids[1], State.HELD, at(170))]
    with fleet.begin() as s:
        states = {r.record.id: r.record.state for r in hr.list_records(s, account="acme")}
        assert states == {ids[0]: State.BOUND, ids[1]: State.HELD, ids[2]: State.BOUND}
        assert steps(s, "acme", leaked[0].logical)[-1][:3] == ("leak_collected", "bound", "held")


def test_one_history_row_per_transition(fleet: S) -> None:
    with fleet.begin() as s:
        a = rec.allocate(s, account="acme", network="lan", now=at(1))
        rec.bind(s, account="acme", record=a.id, instance="i-1", host="h1", host_group="g1",
                 now=at(2))
        rec.move(s, record=a.id, host="h2", host_group="g2", now=at(3))
        rec.preserve(s, account="acme", record=a.id, now=at(4))
        rec.release(s, account="acme", record=a.id, hold_down_s=5, now=at(5))
        rows = s.execute(select(AddressHistory.generation, AddressHistory.event)
                         .where(AddressHistory.record_id == a.id)
                         .order_by(AddressHistory.id)).all()
    assert [tuple(r) for r in rows] == [
        (1, "allocate"), (2, "bind"), (3, "move"), (4, "preserve"), (5, "release"),
    ]


def test_settings_hold_down_is_the_default(fleet: S) -> None:
    cfg = IpamSettings(hold_down_s=7)
    with fleet.begin() as s:
        a = rec.allocate(s, account="acme", network="lan", now=at(1))
        r = rec.release(s, account="acme", record=a.id, settings=cfg, now=at(1))
    assert r.held_until == at(8)

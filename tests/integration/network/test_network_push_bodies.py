"""The bodies a change pushes, made in the change's own transaction (addr_sync).

Hosts in the account's set before and after get the one record; a host that joined gets
the account's bound records; a host that left gets them as removals (the changed record
included). No push needs a further store access.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, insert
from sqlalchemy.orm import Session, sessionmaker

from edgevisor.control import addr_sync
from edgevisor.network import host_reports as hr
from edgevisor.network import records as rec
from edgevisor.store import models, network_models  # noqa: F401 - tables for create_all
from edgevisor.store.base import Base

T0 = datetime(2026, 11, 27, 14, 0, tzinfo=UTC)


class _Links:
    @staticmethod
    def is_local(_host: str) -> bool:
        return False


class _State:
    links = _Links()


def _sessions(tmp_path: Path) -> sessionmaker[Session]:
    engine = create_engine(f"sqlite:///{tmp_path / 'store.db'}")
    rec.configure_sqlite(engine)
    Base.metadata.create_all(engine)
    with engine.begin() as c:
        for i, name in enumerate(("h0", "h1", "h2")):
            c.execute(insert(models.Host).values(
                name=name, credential_sha256=f"{i:064d}", state="down" if name == "h2" else "up",
                agent_url=f"http://{name}:7451", agent_key=f"k{i}", joined_at=0.0,
                last_heartbeat_at=0.0, state_changed_at=0.0, info={}))
    return sessionmaker(engine, expire_on_commit=False)


def _ids(body: dict[str, Any], key: str) -> list[tuple[int, str, str | None]]:
    return sorted((r["id"], r["state"], r["host"]) for r in body[key])


def test_move_bodies_for_staying_joining_and_leaving_hosts(tmp_path: Path) -> None:
    sessions = _sessions(tmp_path)
    with sessions.begin() as s:
        rec.create_network(s, account="acme", name="lan", cidr="10.20.0.0/24", now=T0)
        rec.create_physical_pool(s, host_group="g", cidr="172.16.0.0/24", now=T0)
        a = rec.allocate(s, account="acme", network="lan", address="10.20.0.5", now=T0)
        b = rec.allocate(s, account="acme", network="lan", address="10.20.0.7", now=T0)
        a = rec.bind(s, account="acme", record=a.id, instance="a", host="h0", host_group="g")
        b = rec.bind(s, account="acme", record=b.id, instance="b", host="h1", host_group="g")
        # h1 applied both records; it will drop both when b leaves it.
        hr.report_applied(s, host="h1", reports=[
            hr.AppliedReport(record_id=a.id, generation=a.generation, error=None),
            hr.AppliedReport(record_id=b.id, generation=b.generation, error=None)])
    with sessions.begin() as s:
        before = addr_sync.bound_per_host(s, "acme")
        assert before == {"h0": 1, "h1": 1}
        old, moved = rec.move_from(s, account="acme", record=b.id, host="h2", host_group="g")
        assert old.host == "h1" and moved.host == "h2"
        change = addr_sync.Push(moved, set(before), addr_sync.account_hosts(s, "acme"),
                                first=old.host)
        addr_sync.resolve_endpoints(s, _State(), change)  # type: ignore[arg-type]
    assert [h for h, _ in change.targets()] == ["h1", "h0", "h2"]  # old host first
    # h0 stays in acme's set: just the moved record.
    assert _ids(change.bodies["h0"], "records") == [(b.id, "bound", "h2")]
    assert change.bodies["h0"]["removed"] == []
    # h2 joined: every bound record of acme, the moved one on it.
    assert _ids(change.bodies["h2"], "records") == [(a.id, "bound", "h0"),
                                                    (b.id, "bound", "h2")]
    # h1 left: drops what it holds of acme, nothing to add.
    assert change.bodies["h1"]["records"] == []
    assert _ids(change.bodies["h1"], "removed") == [(a.id, "bound", "h0"),
                                                    (b.id, "bound", "h2")]
    assert all(not body["full"] for body in change.bodies.values())
    # Endpoints from the same transaction; a down host is reported, not called.
    assert change.endpoints["h0"] == ("http://h0:7451", "k0")
    assert change.endpoints["h2"] == "host 'h2' is down"
    # Generations are the ones just committed (the agent ignores older ones).
    assert {r["generation"] for r in change.bodies["h0"]["records"]} == {moved.generation}

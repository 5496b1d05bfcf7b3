"""The addresses API against a real controller (SQLite store): scoping, refusals that
change nothing, exact history, records with what each host applied, host endpoints."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from edgevisor import Client
from edgevisor.errors import (
    Conflict,
    EdgevisorError,
    Forbidden,
    NotFound,
    RequestError,
    ResourceExhausted,
)
from edgevisor.testing.controller import RunningController, running_controller

CAP = {"cpu_count": 1, "memory_mb": 64, "disk_mb": 64}


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def ctl(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RunningController]:
    overrides: dict[str, Any] = {"network.reconcile_interval_s": 0.2,
                                 "network.leak_interval_s": 0.2, "network.hold_down_s": 0.0}
    if request.param == "postgres":
        overrides["controller.store_url"] = request.getfixturevalue(
            "postgres_server").create_database()
    with running_controller(tmp_path / "ctl", overrides) as c:
        yield c


@pytest.fixture
def admin(ctl: RunningController) -> Iterator[Client]:
    with Client(ctl.url, ctl.admin_token) as c:
        yield c


def _account(admin: Client, ctl: RunningController, name: str) -> Client:
    admin.create_account(name)
    return Client(ctl.url, admin.create_token(account=name).secret)


def _join(admin: Client, ctl: RunningController, name: str) -> str:
    jt = admin.create_join_token(host=name).secret
    r = httpx.post(f"{ctl.url}/v1/hosts/join",
                   json={"name": name, "join_token": jt, "capacity": CAP})
    r.raise_for_status()
    return str(r.json()["credential"])


def _snapshot(admin: Client, accounts: list[str]) -> Any:
    out: list[Any] = []
    for a in accounts:
        out.append([n.model_dump() for n in admin.list_networks(a)])
        addrs = admin.list_addresses(a)
        out.append([x.model_dump() for x in addrs])
        out.append([[h.model_dump() for h in admin.address_history(x.id, a)] for x in addrs])
    out.append([p.model_dump() for p in admin.list_physical_pools()])
    return out


def test_accounts_see_only_their_own_and_may_overlap(
    ctl: RunningController, admin: Client
) -> None:
    a = _account(admin, ctl, "acme")
    b = _account(admin, ctl, "bravo")
    a.create_network("net", "10.0.0.0/24")
    b.create_network("net", "10.0.0.0/24")  # another account may overlap
    ra = a.allocate_address("net")
    rb = b.allocate_address("net")
    assert ra.logical == rb.logical == "10.0.0.2"  # .0 network, .1 gateway reserved
    assert [x.id for x in a.list_addresses()] == [ra.id]
    assert [n.account for n in b.list_networks()] == ["bravo"]
    with pytest.raises(NotFound):
        b.get_address(ra.id)
    with pytest.raises(NotFound):
        b.list_networks(account="acme")
    with pytest.raises(NotFound):
        b.preserve_address(ra.id)
    with pytest.raises(RequestError):
        admin.list_addresses()  # the admin names the account
    assert admin.get_address("10.0.0.2", account="acme").id == ra.id
    kinds = [e.kind for e in b.recent_events()]
    assert kinds.count("address.allocated") == 1  # only its own events
    a.close()
    b.close()


def test_every_refusal_leaves_nothing_changed(ctl: RunningController, admin: Client) -> None:
    a = _account(admin, ctl, "acme")
    b = _account(admin, ctl, "bravo")
    _join(admin, ctl, "h1")
    admin.create_physical_pool("10.251.99.0/24")
    a.create_network("net", "10.0.0.0/24")
    a.create_network("tiny", "10.5.0.0/30")  # one assignable address
    a.allocate_address("tiny")
    rec = a.allocate_address("net")
    a.bind_address(rec.logical, "i1", "h1")
    gone = a.allocate_address("net")
    a.release_address(gone.id, hold_down_s=60)
    b.create_network("net", "10.0.0.0/24")
    bpres = b.allocate_address("net")
    b.bind_address(bpres.id, "ib", "h1")
    b.preserve_address(bpres.id)

    def refused(fn: Callable[[], object], kind: type[EdgevisorError], words: str) -> None:
        before = _snapshot(admin, ["acme", "bravo"])
        with pytest.raises(kind) as info:
            fn()
        assert words in info.value.message
        assert _snapshot(admin, ["acme", "bravo"]) == before

    refused(lambda: a.create_network("bad", "10.0.0.0/33"), RequestError, "invalid CIDR")
    refused(lambda: a.create_network("bad", "10.7.0.1/24"), RequestError, "invalid CIDR")
    refused(lambda: a.create_network("over", "10.0.0.128/25"), Conflict, "overlaps")
    refused(lambda: a.create_network("small", "10.9.0.0/31"), RequestError, "too small")
    refused(lambda: a.create_network("big", "10.0.0.0/7"), RequestError, "too large")
    refused(lambda: a.allocate_address("net", "10.1.0.5"), RequestError, "10.1.0.5")
    refused(lambda: a.allocate_address("net", rec.logical), Conflict, "already taken")
    refused(lambda: a.claim_address(bpres.id, "i9", "h1"), Forbidden, "another account")
    refused(lambda: a.release_address(gone.id), Conflict, "already released")
    refused(lambda: a.allocate_address("tiny"), ResourceExhausted, "10.5.0.0/30")
    refused(lambda: a.bind_address(rec.id, "i2", "h1"), Conflict, "already bound")
    refused(lambda: a.allocate_address("nope"), NotFound, "nope")
    refused(lambda: b.claim_address(bpres.id, "i1", "h1"), Conflict, "i1")  # instance taken
    refused(lambda: b.claim_address(bpres.id, "ib2", "ghost"), NotFound, "ghost")
    refused(lambda: a.delete_network("net"), Conflict, "still has")
    refused(lambda: a.create_physical_pool("10.252.0.0/24"), Forbidden, "admin")
    a.close()
    b.close()


def test_history_lists_every_transition_exactly(ctl: RunningController, admin: Client) -> None:
    a = _account(admin, ctl, "acme")
    _join(admin, ctl, "h1")
    _join(admin, ctl, "h2")
    admin.create_physical_pool("10.251.99.0/24")
    a.create_network("net", "10.0.0.0/24")
    r = a.allocate_address("net", "10.0.0.77")
    b1 = a.bind_address("10.0.0.77", "i1", "h1")
    assert (b1.state, b1.host, b1.generation) == ("bound", "h1", 2)
    p = a.preserve_address(r.id)
    assert (p.state, p.host, p.physical) == ("preserved", None, None)
    c = a.claim_address("10.0.0.77", "i2", "h1")
    m = a.move_address(r.id, "h2", expected_generation=c.generation)
    assert (m.host, m.instance) == ("h2", "i2") and m.physical != c.physical
    with pytest.raises(Conflict):
        a.move_address(r.id, "h1", expected_generation=c.generation)  # stale generation
    a.release_address(r.id, hold_down_s=0)
    with pytest.raises(NotFound):
        a.get_address(r.id)
    hist = a.address_history("10.0.0.77")
    assert [(h.event, h.from_state, h.to_state, h.generation, h.instance, h.host)
            for h in hist] == [
        ("allocate", None, "allocated", 1, None, None),
        ("bind", "allocated", "bound", 2, "i1", "h1"),
        ("preserve", "bound", "preserved", 3, None, None),
        ("claim", "preserved", "bound", 4, "i2", "h1"),
        ("move", "bound", "bound", 5, "i2", "h2"),
        ("release", "bound", "held", 6, None, None),
        ("expire", "held", "released", 7, None, None),
    ]
    assert hist[4].physical == m.physical
    # The address lives again; its history shows both lives.
    r2 = a.allocate_address("net", "10.0.0.77")
    assert r2.id != r.id
    assert [h.event for h in a.address_history("10.0.0.77")][-1] == "allocate"
    assert len(a.address_history(r2.id)) == 1
    kinds = [e.kind for e in a.recent_events() if e.kind.startswith("address.")]
    assert kinds == ["address.allocated", "address.bound", "address.preserved",
                     "address.claimed", "address.moved", "address.released",
                     "address.allocated"]
    a.close()


def test_hosts_fetch_their_records_and_report_generations(
    ctl: RunningController, admin: Client
) -> None:
    a = _account(admin, ctl, "acme")
    cred1 = _join(admin, ctl, "h1")
    cred2 = _join(admin, ctl, "h2")
    _join(admin, ctl, "h3")
    admin.create_physical_pool("10.251.99.0/24")
    a.create_network("net", "10.0.0.0/24")
    x = a.bind_address(a.allocate_address("net").id, "ix", "h1")
    y = a.bind_address(a.allocate_address("net").id, "iy", "h2")
    a.allocate_address("net")  # allocated only: nobody translates it

    def host_get(name: str, cred: str) -> httpx.Response:
        return httpx.get(f"{ctl.url}/v1/hosts/{name}/records",
                         headers={"authorization": f"Bearer {cred}"})

    got = host_get("h1", cred1).json()
    assert sorted(r["id"] for r in got["records"]) == [x.id, y.id]
    assert host_get("h3", cred1).status_code == 403  # not its own
    assert httpx.get(f"{ctl.url}/v1/hosts/h1/records").status_code == 401

    status = {s.record.id: s for s in admin.list_records(account="acme")}
    assert status[x.id].needed_by == ["h1", "h2"]
    assert sorted(status[x.id].drift) == ["h1", "h2"]  # no host has reported yet

    def report(name: str, cred: str, body: dict[str, Any]) -> httpx.Response:
        return httpx.post(f"{ctl.url}/v1/hosts/{name}/records/applied", json=body,
                          headers={"authorization": f"Bearer {cred}"})

    assert report("h1", cred1, {"reports": [
        {"record_id": x.id, "generation": x.generation},
        {"record_id": y.id, "generation": y.generation}]}).status_code == 204
    assert report("h2", cred2, {"reports": [
        {"record_id": x.id, "generation": x.generation},
        {"record_id": y.id, "generation": 1, "error": "nft refused"}]}).status_code == 204
    # A generation the record never had is refused.
    assert report("h2", cred2, {"reports": [
        {"record_id": x.id, "generation": 99}]}).status_code == 400
    status = {s.record.id: s for s in a.list_records()}
    assert status[x.id].drift == []
    assert status[y.id].drift == ["h2"]
    h2 = {ap.host: ap for ap in status[y.id].applied}["h2"]
    assert (h2.generation, h2.error) == (0, "nft refused")
    assert [s.record.id for s in a.list_records(host="h2")] == [y.id]

    # A preserve: h1 must now drop y's mapping (it shows up in "removed").
    a.preserve_address(y.id)
    got = host_get("h1", cred1).json()
    assert [r["id"] for r in got["records"]] == [x.id]
    assert [r["id"] for r in got["removed"]] == [y.id]
    a.close()


def test_cli_record_list_shows_applied_generation(
    ctl: RunningController, admin: Client
) -> None:
    from typer.testing import CliRunner

    from edgevisor.cli.main import app

    a = _account(admin, ctl, "acme")
    cred = _join(admin, ctl, "h1")
    runner = CliRunner()
    admin_args = ["--url", ctl.url, "--token", ctl.admin_token]
    out = runner.invoke(app, ["network", "pool-create", "10.251.99.0/24", *admin_args])
    assert out.exit_code == 0, out.output
    out = runner.invoke(app, ["network", "pool-list", *admin_args, "--json"])
    assert json.loads(out.output)[0]["cidr"] == "10.251.99.0/24"
    args = [*admin_args, "--account", "acme"]
    out = runner.invoke(app, ["network", "create", "net", "10.0.0.0/24", *args])
    assert out.exit_code == 0, out.output
    out = runner.invoke(app, ["address", "allocate", "--network", "net", "10.0.0.9", *args])
    assert out.exit_code == 0, out.output
    out = runner.invoke(app, ["address", "bind", "10.0.0.9", "-i", "i1", "--host", "h1",
                              *args, "--json"])
    assert out.exit_code == 0, out.output
    httpx.post(f"{ctl.url}/v1/hosts/h1/records/applied",
               headers={"authorization": f"Bearer {cred}"},
               json={"reports": [{"record_id": 1, "generation": 1}]}).raise_for_status()
    out = runner.invoke(app, ["record", "list", *args, "--json"])
    assert out.exit_code == 0, out.output
    rows = json.loads(out.output)
    assert rows[0]["record"]["generation"] == 2
    assert rows[0]["applied"][0]["generation"] == 1 and rows[0]["drift"] == ["h1"]
    out = runner.invoke(app, ["address", "release", "10.0.0.9", *args])
    out = runner.invoke(app, ["address", "release", "10.0.0.9", *args])
    assert out.exit_code != 0
    a.close()


def test_leaked_address_is_collected_after_its_host_stops_reporting_it(
    tmp_path: Path,
) -> None:
    overrides = {"network.leak_interval_s": 0.2, "network.leak_grace_s": 0.5,
                 "network.hold_down_s": 60.0}
    with running_controller(tmp_path / "ctl", overrides) as ctl, \
            Client(ctl.url, ctl.admin_token) as admin:
        admin.create_account("acme")
        cred = _join(admin, ctl, "h1")
        admin.create_physical_pool("10.251.99.0/24")
        admin.create_network("net", "10.0.0.0/24", account="acme")
        keep = admin.allocate_address("net", account="acme")
        admin.bind_address(keep.id, "alive", "h1", account="acme")
        lost = admin.allocate_address("net", account="acme")
        admin.bind_address(lost.id, "dead", "h1", account="acme")
        httpx.post(f"{ctl.url}/v1/hosts/h1/records/applied", json={"instances": ["alive"]},
                   headers={"authorization": f"Bearer {cred}"}).raise_for_status()

        def state(ref: int) -> str:
            return admin.get_address(ref, account="acme").state

        deadline = time.monotonic() + 20
        while state(lost.id) != "held":
            assert time.monotonic() < deadline, "leak never collected"
            time.sleep(0.1)
        assert state(keep.id) == "bound"  # still reported: never freed
        events = [h.event for h in admin.address_history(lost.id, account="acme")]
        assert events == ["allocate", "bind", "leak_collected"]
        assert "address.leak_collected" in [e.kind for e in admin.recent_events()]


async def test_without_the_dataplane_operations_answer_clearly(tmp_path: Path) -> None:
    from edgevisor.agent.addresses import AddressesCapability, DataplaneUnavailable
    from edgevisor.agent.daemon import Agent
    from edgevisor.settings import load_settings

    settings = load_settings(overrides={"data_dir": str(tmp_path),
                                        "agent.host_name": "lonely",
                                        "network.dataplane_mode": "off"}, environ={})
    agent = Agent(settings)
    cap = AddressesCapability(settings)
    await cap.start(agent)
    try:
        for op in ("records.apply", "records.state", "instances.create"):
            with pytest.raises(DataplaneUnavailable) as info:
                await agent.router.dispatch(op, {})
            assert "address translation is unavailable on host lonely" in info.value.message
        await cap.connected()  # nothing to rebuild, no error
    finally:
        await cap.stop()

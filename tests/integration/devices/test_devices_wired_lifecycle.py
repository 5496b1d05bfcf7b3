"""Lifecycle of what deployments and accounts put on an agent: a version that drops a
device removes it (credentials gone, connection closed) and a rollback brings it back;
deleting an account purges its objects from the agents, also from a host that was away."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from devices_wired_helpers import ECHO_TASK, Fleet, MqttSub, bundle, fleet, mqtt_pub, wait_until

from edgevisor import Client
from edgevisor.control.api_accounts import _pending_purges
from edgevisor.errors import Conflict
from edgevisor.store import repos
from edgevisor.store.volume_models import VolumeRecord

ECHO2_TASK = {**ECHO_TASK, "edgevisor.toml": ECHO_TASK["edgevisor.toml"].replace("echo", "echo2")}
ROUTE_R1 = {
    "name": "r1",
    "topic_filter": "devices/acme.s1/in",
    "source_device": "s1",
    "destination": {"kind": "task", "task": "echo", "reply_topic": "devices/acme.s1/out"},
}
ROUTE_R2 = {
    "name": "r2",
    "topic_filter": "devices/acme.s2/in",
    "source_device": "s2",
    "destination": {"kind": "task", "task": "echo", "reply_topic": "devices/acme.s2/out"},
}
TIMER_T2 = {"name": "t2", "task": "echo", "cron": "0 0 1 1 *"}


@pytest.fixture
def f(tmp_path: Path) -> Iterator[Fleet]:
    with fleet(tmp_path) as fl:
        yield fl


def _task(files: dict[str, str]) -> dict[str, Any]:
    # A generous call timeout: a loaded test machine must not fail the echo round trip.
    return {"archive_b64": base64.b64encode(bundle(files)).decode(),
            "overrides": {"timeout": "60s"}}  # fmt: skip


def _wait_state(acme: Client, version: int) -> Any:
    def done() -> Any:
        for d in acme.deployment_status(history=True):
            if d.version == version and d.state in ("succeeded", "failed", "cancelled"):
                return d
        return None

    return wait_until(done, 120, f"deployment v{version} finished")


def _refused(f: Fleet, user: str, password: str) -> bool:
    res = mqtt_pub(f.broker_port, user, password, f"devices/{user}/x", "1")
    return res.returncode != 0 and "not authorised" in res.stderr


V1 = {
    "devices": [{"name": "s1", "password": "pw-s1"}, {"name": "s2", "password": "pw-s2"}],
    "routes": [ROUTE_R1, ROUTE_R2],
    "timers": [TIMER_T2],
}
V2 = {"devices": [{"name": "s1", "password": "pw-s1"}], "routes": [ROUTE_R1]}


def test_deployment_drops_device_and_rollback_restores_it(f: Fleet) -> None:
    acme = f.account_client("acme")
    acme.apply_deployment({"tasks": [_task(ECHO_TASK), _task(ECHO2_TASK)], **V1})
    assert _wait_state(acme, 1).state == "succeeded"
    svc = f.agent.capability("devices").service
    coord = f.agent.capability("tasks").coordinator
    acme.update_shadow("s2", desired={"led": "on"})
    assert svc.shadows.get("acme.s2").version == 1

    # v2 drops s2, its route and timer, and task echo2; removing echo2 fails here, after
    # s2 is gone: the undo must bring s2 back exactly (password, shadow), and r2, t2.
    real_remove = coord.remove

    async def failing_remove(name: str) -> None:
        if name == "acme.echo2":
            raise RuntimeError("injected: cannot remove echo2")
        await real_remove(name)

    coord.remove = failing_remove  # type: ignore[method-assign]
    try:
        acme.apply_deployment({"tasks": [_task(ECHO_TASK)], **V2})
        d2 = _wait_state(acme, 2)
    finally:
        coord.remove = real_remove  # type: ignore[method-assign]
    assert d2.state == "failed" and d2.failed_step == "remove old tasks"
    assert [s.name for s in d2.steps if s.state == "done"][-1] == "remove old devices"
    assert svc.registry.exists("acme.s2")
    assert svc.shadows.get("acme.s2").desired == {"led": "on"}
    assert "acme.r2" in svc.routes.routes and "acme.t2" in svc.timer_core.timers
    assert not _refused(f, "acme.s2", "pw-s2")
    assert {d.name for d in acme.list_devices()} == {"s1", "s2"}

    # v3 = v2 without the fault: s2 goes, with its open connection and its credentials.
    with MqttSub(f.broker_port, "acme.s2", "pw-s2", "devices/acme.s2/#") as sub:
        acme.apply_deployment({"tasks": [_task(ECHO_TASK)], **V2})
        assert _wait_state(acme, 3).state == "succeeded"
        assert sub.proc.wait(60) is not None  # closed by the broker, reconnect refused
    assert not svc.registry.exists("acme.s2")
    assert svc.shadows.get("acme.s2").version == 0
    assert "acme.r2" not in svc.routes.routes and "acme.t2" not in svc.timer_core.timers
    assert not any(t.name == "acme.echo2" for t in coord.list())
    assert _refused(f, "acme.s2", "pw-s2")
    assert not _refused(f, "acme.s1", "pw-s1")
    assert {d.name for d in acme.list_devices()} == {"s1"}
    assert {r.name for r in acme.list_routes()} == {"r1"}
    assert {t.name for t in acme.list_timers()} == set()

    # Rolling back to the first version's content brings s2 (and its route) back.
    acme.apply_deployment({"tasks": [_task(ECHO_TASK), _task(ECHO2_TASK)], **V1})
    assert _wait_state(acme, 4).state == "succeeded"
    assert not _refused(f, "acme.s2", "pw-s2")
    assert {d.name for d in acme.list_devices()} == {"s1", "s2"}
    with MqttSub(f.broker_port, "acme.s2", "pw-s2", "devices/acme.s2/out") as sub:
        res = mqtt_pub(f.broker_port, "acme.s2", "pw-s2", "devices/acme.s2/in", '{"k": 1}')
        assert res.returncode == 0, res.stderr
        assert json.loads(sub.messages(1)[0][1])["echo"] == {"k": 1}


def _acme_objects(f: Fleet) -> dict[str, list[str]]:
    svc = f.agent.capability("devices").service
    coord = f.agent.capability("tasks").coordinator
    mine = lambda n: n.startswith("acme.")  # noqa: E731
    return {
        "devices": [d.name for d in svc.devices() if mine(d.name)],
        "routes": [n for n in svc.routes.routes if mine(n)],
        "timers": [n for n in svc.timer_core.timers if mine(n)],
        "shadows": [n for n in svc.shadows.devices() if mine(n)],
        "tasks": [t.name for t in coord.list() if mine(t.name)],
    }


def _populate(f: Fleet) -> Client:
    acme = f.account_client("acme")
    acme.apply_deployment({"tasks": [_task(ECHO_TASK)], **V1})
    assert _wait_state(acme, 1).state == "succeeded"
    acme.add_device("s9", password="pw-s9")
    acme.update_shadow("s9", desired={"x": 1})
    other = f.account_client("other")
    other.add_device("o1", password="pw-o1")
    assert all(_acme_objects(f).values())
    return acme


def test_account_delete_purges_agent_objects(f: Fleet) -> None:
    _populate(f)
    # An account holding a volume is not deleted (its data is on a host's disk).
    st = f.ctl.state
    assert st is not None
    with st.store.session() as s:
        acct_id = repos.get_account(s, "acme").id
        s.add(VolumeRecord(account_id=acct_id, name="vol1", host="local", size_bytes=1 << 20,
                           block_size=4096, created_at=0.0))  # fmt: skip
    with pytest.raises(Conflict) as exc:
        f.admin.delete_account("acme")
    assert exc.value.details == {"volumes": ["vol1"]}
    assert all(_acme_objects(f).values())  # nothing was touched
    with st.store.session() as s:
        s.delete(s.query(VolumeRecord).filter_by(name="vol1").one())

    with MqttSub(f.broker_port, "acme.s1", "pw-s1", "devices/acme.s1/#") as sub:
        f.admin.delete_account("acme")
        assert sub.proc.wait(60) is not None  # its connection was closed
    assert _acme_objects(f) == {k: [] for k in ("devices", "routes", "timers", "shadows",
                                                "tasks")}  # fmt: skip
    assert "acme" not in f.agent.capability("devices").deployer.state
    assert _refused(f, "acme.s1", "pw-s1") and _refused(f, "acme.s9", "pw-s9")
    assert not _refused(f, "other.o1", "pw-o1")  # another account's device is untouched
    with st.store.session() as s:  # the host confirmed: nothing left pending for it
        assert _pending_purges(s, "local") == []


def test_account_delete_purges_a_host_that_was_away(f: Fleet) -> None:
    _populate(f)
    st = f.ctl.state
    assert st is not None
    st.links.detach_local("local")  # the host cannot be reached now
    try:
        f.admin.delete_account("acme")  # still deleted: the host purges when it is back
    finally:
        st.links.attach_local("local", f.agent.router)
    assert _acme_objects(f)["devices"]  # not purged yet
    devices = f.agent.capability("devices")
    f.on_agent_loop(devices.connected())  # what the agent runs when the link comes back
    assert _acme_objects(f) == {k: [] for k in ("devices", "routes", "timers", "shadows",
                                                "tasks")}  # fmt: skip
    assert _refused(f, "acme.s1", "pw-s1")
    # Done once: a second reconnect finds nothing pending.
    with st.store.session() as s:
        assert _pending_purges(s, "local") == []

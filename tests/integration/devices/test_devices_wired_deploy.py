"""Deployments: a version that fails to start rolls back by itself with the failing step
named; a stuck version can be cancelled; the CLI applies a TOML deployment file."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from devices_wired_helpers import ECHO_TASK, Fleet, MqttSub, bundle, fleet, mqtt_pub, wait_until

from edgevisor import Client

BROKEN_TASK = {
    "edgevisor.toml": 'name = "broken"\nruntime = "python"\nhandler = "m:h"\n',
    "m.py": "raise ImportError('this task cannot start')\n",
}
SLOW_TASK = {
    "edgevisor.toml": 'name = "slow"\nruntime = "python"\nhandler = "m:h"\n',
    "m.py": "import time\ntime.sleep(600)\ndef h(event, context):\n    return 1\n",
}
ROUTE_R1 = {
    "name": "r1",
    "topic_filter": "devices/acme.s1/in",
    "source_device": "s1",
    "destination": {"kind": "task", "task": "echo", "reply_topic": "devices/acme.s1/out"},
}


@pytest.fixture
def f(tmp_path: Path) -> Iterator[Fleet]:
    with fleet(tmp_path) as fl:
        yield fl


def _task(files: dict[str, str], **overrides: Any) -> dict[str, Any]:
    return {"archive_b64": base64.b64encode(bundle(files)).decode(), "overrides": overrides}


def _write_v1(tmp: Path) -> Path:
    task_dir = tmp / "deploy" / "echo"
    task_dir.mkdir(parents=True)
    for name, text in ECHO_TASK.items():
        (task_dir / name).write_text(text)
    path = tmp / "deploy" / "v1.toml"
    r1 = ROUTE_R1
    path.write_text(
        'hosts = ["local"]\n'
        '[[tasks]]\ndir = "echo"\n'
        '[[devices]]\nname = "s1"\npassword = "pw-s1"\n'
        f'[[routes]]\nname = "r1"\ntopic_filter = "{r1["topic_filter"]}"\n'
        'source_device = "s1"\n'
        'destination = { kind = "task", task = "echo", reply_topic = "devices/acme.s1/out" }\n'
    )
    return path


def _apply_v1_with_cli(f: Fleet, acme: Client) -> None:
    path = _write_v1(f.tmp)
    res = subprocess.run(
        [str(Path(sys.executable).parent / "edgevisor"), "deploy", "apply", str(path),
         "--url", f.ctl.url, "--token", acme.token or "", "--json"],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    out = json.loads(res.stdout)
    assert [(d["version"], d["state"]) for d in out] == [(1, "succeeded")]


def _wait_state(acme: Client, version: int, states: tuple[str, ...]) -> Any:
    def done() -> Any:
        for d in acme.deployment_status(history=True):
            if d.version == version and d.state in states:
                return d
        return None

    return wait_until(done, 120, f"deployment v{version} in {states}")


def _step_now(deployer: Any) -> str | None:
    """The step acme's running deployment is on (None before its first step: the apply
    task may not have started yet, or not have begun a step)."""
    if "acme" not in deployer._running:
        return None
    last = (deployer.state.get("acme") or {}).get("last") or {}
    steps = last.get("steps") or []
    return str(steps[-1]["name"]) if steps else None


def _echo_roundtrip(f: Fleet, text: str) -> dict[str, Any]:
    port = f.broker_port
    with MqttSub(port, "acme.s1", "pw-s1", "devices/acme.s1/out") as sub:
        res = mqtt_pub(port, "acme.s1", "pw-s1", "devices/acme.s1/in", json.dumps({"t": text}))
        assert res.returncode == 0, res.stderr
        out: dict[str, Any] = json.loads(sub.messages(1)[0][1])
    return out


def test_failed_second_task_rolls_back_by_itself(f: Fleet) -> None:
    acme = f.account_client("acme")
    _apply_v1_with_cli(f, acme)
    coord = f.agent.capability("tasks").coordinator
    v1_echo = coord.show("acme.echo").version
    assert _echo_roundtrip(f, "v1")["echo"] == {"t": "v1"}
    assert [d.name for d in acme.list_devices()] == ["s1"]
    tasks = acme.list_tasks()
    assert [(t.name, t.version, t.hosts) for t in tasks] == [("echo", v1_echo, ["local"])]

    v2 = acme.apply_deployment({
        "tasks": [_task(ECHO_TASK, memory="96M"), _task(BROKEN_TASK)],
        "devices": [{"name": "s1"}],
        "routes": [{**ROUTE_R1, "name": "r2"}],
    })  # fmt: skip
    assert [(d.version, d.state) for d in v2] == [(2, "pending")]
    d = _wait_state(acme, 2, ("failed", "succeeded", "cancelled"))
    assert d.state == "failed"
    assert d.failed_step == "stage task broken"
    assert "cannot start" in (d.error or "")
    assert [s.state for s in d.steps][-1] == "failed"
    # Still exactly version 1: the first task's new version never ran.
    assert coord.show("acme.echo").version == v1_echo
    assert coord.show("acme.echo").spec.memory_mb == 64
    assert not any(t.name.startswith("acme.broken") for t in coord.list())
    routes = f.agent.capability("devices").service.routes.routes
    assert sorted(n for n in routes if n.startswith("acme.")) == ["acme.r1"]
    assert _echo_roundtrip(f, "after")["echo"] == {"t": "after"}
    status = f.agent.capability("devices").deployer.state["acme"]
    assert status["good"]["version"] == 1 and status["last"]["state"] == "failed"


def test_stuck_deployment_can_be_cancelled(f: Fleet) -> None:
    acme = f.account_client("acme")
    v1 = acme.apply_deployment({"tasks": [_task(ECHO_TASK)]})
    assert v1[0].version == 1
    _wait_state(acme, 1, ("succeeded",))
    coord = f.agent.capability("tasks").coordinator
    v1_echo = coord.show("acme.echo").version

    acme.apply_deployment({"tasks": [_task(ECHO_TASK, memory="96M"), _task(SLOW_TASK)]})

    deployer = f.agent.capability("devices").deployer
    wait_until(lambda: _step_now(deployer) == "stage task slow", 120, "stuck at stage task slow")
    out = acme.cancel_deployment()
    assert [(d.version, d.state) for d in out] == [(2, "cancelled")]
    # The agent interrupted the step (not waiting for the start timeout) and rolled back.
    last = deployer.state["acme"]["last"]
    assert last["state"] == "cancelled" and last["failed_step"] == "stage task slow"
    assert "acme" not in deployer._running
    assert coord.show("acme.echo").version == v1_echo
    assert not any(t.name.startswith("acme.slow") for t in coord.list())
    final = _wait_state(acme, 2, ("cancelled",))
    assert final.failed_step == "stage task slow"


def test_undo_puts_back_the_exact_previous_task_version(f: Fleet) -> None:
    """The rollback of a switched task redeploys the remembered bundle and effective spec,
    which must give back the very same version (digest of bundle + spec)."""
    acme = f.account_client("acme")
    first = acme.deploy_task(bundle(ECHO_TASK), memory="80M", timeout="2s")
    coord = f.agent.capability("tasks").coordinator
    deployer = f.agent.capability("devices").deployer
    prev = deployer._previous_task(coord, "acme.echo")
    second = acme.deploy_task(bundle(ECHO_TASK), memory="96M")
    assert second.version != first.version
    assert coord.show("acme.echo").version == second.version
    f.on_agent_loop(deployer._undo("acme", [("task", ("acme.echo", prev))]))
    assert coord.show("acme.echo").version == first.version
    f.on_agent_loop(deployer._undo("acme", [("task", ("acme.echo", None))]))
    assert not any(t.name == "acme.echo" for t in coord.list())


def test_missing_bundle_fails_at_fetch_and_nothing_changes(f: Fleet) -> None:
    acme = f.account_client("acme")
    acme.deploy_task(bundle(ECHO_TASK))
    v1 = acme.apply_deployment({"tasks": [{"name": "echo"}], "routes": [
        {"name": "r9", "topic_filter": "acme/in",
         "destination": {"kind": "task", "task": "echo"}}]})  # fmt: skip
    assert v1[0].spec["tasks"][0]["bundle"] == acme.get_task("echo").bundle
    _wait_state(acme, 1, ("succeeded",))
    acme.apply_deployment({"tasks": [{"name": "echo"}, {"name": "ghost", "bundle": "0" * 64}]})
    d = _wait_state(acme, 2, ("failed", "succeeded"))
    assert d.state == "failed" and d.failed_step == "fetch task ghost"
    assert "not found" in (d.error or "")
    routes = f.agent.capability("devices").service.routes.routes
    assert [n for n in routes if n.startswith("acme.")] == ["acme.r9"]


def test_new_version_supersedes_a_stuck_one(f: Fleet) -> None:
    acme = f.account_client("acme")
    acme.apply_deployment({"tasks": [_task(ECHO_TASK), _task(SLOW_TASK)]})
    deployer = f.agent.capability("devices").deployer
    wait_until(lambda: _step_now(deployer) == "stage task slow", 120, "stuck at stage task slow")
    acme.apply_deployment({"tasks": [_task(ECHO_TASK, memory="96M")]})
    d = _wait_state(acme, 2, ("succeeded", "failed"))
    assert d.state == "succeeded"
    history = {x.version: x for x in acme.deployment_status(history=True)}
    assert history[1].state == "cancelled" and "superseded" in (history[1].error or "")
    coord = f.agent.capability("tasks").coordinator
    assert coord.show("acme.echo").spec.memory_mb == 96
    assert not any(t.name.startswith("acme.slow") for t in coord.list())

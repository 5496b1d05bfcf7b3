"""Controller and agent as separate processes (the fleet shape: the controller reaches the
agent over its HTTP API): the controller process is stopped, routed traffic and shadow
updates go on, the controller is started again and everything arrives in order."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from devices_wired_helpers import ECHO_TASK, MqttSub, bundle, mqtt_pub, wait_until

from edgevisor import Client, Conflict
from edgevisor.testing.controller import free_port

EXE = str(Path(sys.executable).parent / "edgevisor")


class Procs:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.api = free_port()
        self.broker = free_port()
        self.url = f"http://127.0.0.1:{self.api}"
        self.ctl: subprocess.Popen[bytes] | None = None
        self.agent: subprocess.Popen[bytes] | None = None

    def start_controller(self) -> None:
        log = open(self.tmp / "controller.log", "ab")  # noqa: SIM115 - owned by the process
        self.ctl = subprocess.Popen(
            [EXE, "controller", "--data-dir", str(self.tmp / "ctl"), "--port", str(self.api)],
            stdout=log, stderr=log,
        )  # fmt: skip

        def healthy() -> bool:
            try:
                return httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(healthy, 60, "controller healthy")

    def stop_controller(self) -> None:
        assert self.ctl is not None
        self.ctl.send_signal(signal.SIGTERM)
        self.ctl.wait(30)
        self.ctl = None

    def start_agent(self, join_token: str) -> None:
        env = {
            **os.environ,
            "EDGEVISOR_DEVICES__BROKER_PORT": str(self.broker),
            "EDGEVISOR_DEVICES__SPOOL_RETRY_INTERVAL_S": "0.3",
            "EDGEVISOR_AGENT__HEARTBEAT_INTERVAL_S": "0.5",
            "EDGEVISOR_AGENT__LISTEN_PORT": "0",
        }
        log = open(self.tmp / "agent.log", "ab")  # noqa: SIM115 - owned by the process
        self.agent = subprocess.Popen(
            [EXE, "agent", "--controller", self.url, "--host", "h1", "--join-token", join_token,
             "--data-dir", str(self.tmp / "agent")],
            stdout=log, stderr=log, env=env,
        )  # fmt: skip

    def close(self) -> None:
        for p in (self.agent, self.ctl):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = Procs(tmp_path)
    try:
        yield p
    finally:
        p.close()


def _admin(p: Procs) -> Client:
    return Client(p.url, (p.tmp / "ctl" / "admin.token").read_text().strip())


def test_controller_process_stopped_and_restarted(procs: Procs) -> None:
    procs.start_controller()
    with _admin(procs) as admin:
        procs.start_agent(admin.create_join_token(host="h1").secret)
        wait_until(lambda: any(h.state == "up" for h in admin.list_hosts()), 90, "host up")
        admin.create_account("acme")
        token = admin.create_token("acme").secret
    acme = Client(procs.url, token)
    try:
        acme.deploy_task(bundle(ECHO_TASK))
        dev = acme.add_device("d1")
        user, pw, port = dev.username, dev.password, procs.broker
        acme.add_route({"name": "up", "topic_filter": "devices/acme.d1/telemetry",
                        "source_device": "d1", "destination": {"kind": "controller"}})  # fmt: skip
        acme.add_route({"name": "calc", "topic_filter": "devices/acme.d1/calc",
                        "source_device": "d1",
                        "destination": {"kind": "task", "task": "echo",
                                        "reply_topic": "devices/acme.d1/answer"}})  # fmt: skip
        acme.update_shadow("d1", desired={"mode": "eco"})
        with pytest.raises(Conflict, match="current version is 1"):  # typed over HTTP too
            acme.update_shadow("d1", desired={"mode": "x"}, version=0)

        procs.stop_controller()
        n = 20
        with MqttSub(port, user, pw, "devices/acme.d1/answer") as answers:
            for i in range(n):
                assert mqtt_pub(port, user, pw, "devices/acme.d1/telemetry",
                                json.dumps({"n": i})).returncode == 0  # fmt: skip
                assert mqtt_pub(port, user, pw, "devices/acme.d1/calc",
                                json.dumps({"i": i})).returncode == 0  # fmt: skip
                if i % 5 == 0:
                    body = json.dumps({"state": {"reported": {"mode": "eco", "i": i}}})
                    assert mqtt_pub(port, user, pw, "edgevisor/shadow/acme.d1/update",
                                    body).returncode == 0  # fmt: skip
            got = answers.messages(n)
        assert [json.loads(x)["echo"]["i"] for _, x in got] == list(range(n))

        procs.start_controller()
        wait_until(lambda: len([m for m in acme.device_messages() if m.kind == "message"]) >= n,
                   90, "spool delivered")  # fmt: skip
        items = acme.device_messages()
        assert [m.body["payload"]["n"] for m in items if m.kind == "message"] == list(range(n))
        shadow = wait_until(
            lambda: (s := acme.get_shadow("d1")).state["reported"].get("i") == 15 and s, 90, "sync"
        )
        assert shadow.state["desired"] == {"mode": "eco"} and shadow.state["delta"] == {}

        # A deployment reaches the agent over its HTTP API (poke) and succeeds.
        archive = base64.b64encode(bundle(ECHO_TASK)).decode()
        acme.apply_deployment({"tasks": [{"archive_b64": archive, "overrides": {"memory": "96M"}}]})
        done = wait_until(
            lambda: (d := acme.deployment_status()[0]).state not in ("pending", "applying") and d,
            120, "deployment done",
        )  # fmt: skip
        assert done.state == "succeeded", done
        assert acme.get_task("echo").spec["memory_mb"] == 96
    finally:
        acme.close()

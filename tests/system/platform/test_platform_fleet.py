"""A 3-host fleet in network namespaces: join, heartbeat, down on loss, back on restart."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from edgevisor import Client
from edgevisor.testing.controller import running_controller
from edgevisor.testing.topology import Topology

pytestmark = pytest.mark.root

FAST = {
    "EDGEVISOR_AGENT__HEARTBEAT_INTERVAL_S": "0.3",
    "EDGEVISOR_AGENT__LISTEN_HOST": "0.0.0.0",
    "EDGEVISOR_AGENT__LISTEN_PORT": "7451",
    "EDGEVISOR_DEVICES__BROKER_PORT": "0",
}


def _wait(pred: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout_s}s")
        time.sleep(0.1)


def _states(admin: Client) -> dict[str, str]:
    return {h.name: h.state for h in admin.list_hosts()}


def test_three_hosts_join_heartbeat_go_down_and_come_back(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEVISOR_")} | FAST
    with Topology(3) as topo:
        overrides = {"controller.heartbeat_timeout_s": 2.0, "controller.reconcile_interval_s": 0.2}
        with running_controller(tmp_path / "ctl", overrides, host=topo.controller_address) as ctl:
            admin = Client(ctl.url, ctl.admin_token)
            port = int(ctl.url.rsplit(":", 1)[1])
            for h in topo.hosts:
                jt = admin.create_join_token(host=h.name).secret
                argv = topo.agent_argv(
                    h, controller_port=port, join_token=jt, data_dir=tmp_path / h.name
                )
                topo.start_agent(h, argv, env=env)
            names = [h.name for h in topo.hosts]
            _wait(lambda: all(_states(admin).get(n) == "up" for n in names), "all hosts up")

            # Each host reports the address it has on the fabric, and answers the
            # controller on its agent API (authenticated with its key).
            by_name = {h.name: h for h in admin.list_hosts()}
            for h in topo.hosts:
                assert by_name[h.name].physical_address == h.address
                info = asyncio.run(ctl.state.links.call(h.name, "agent.info", {}))
                assert info["host"] == h.name
            beats = {h.name: h.last_heartbeat_at for h in admin.list_hosts()}
            _wait(
                lambda: all(h.last_heartbeat_at > beats[h.name] for h in admin.list_hosts()),
                "heartbeats advance",
            )

            victim = topo.hosts[1]
            stopped_at = time.monotonic()
            topo.stop_agent(victim)
            _wait(lambda: _states(admin)[victim.name] == "down", "victim down", timeout_s=20)
            # Marked down after the 2 s timeout, not before and not much later.
            assert time.monotonic() - stopped_at >= 1.5
            assert all(_states(admin)[h.name] == "up" for h in topo.hosts if h is not victim)

            # A restart needs no join token: the stored credential is enough.
            argv = [
                a
                for a in topo.agent_argv(
                    victim, controller_port=port, join_token="-", data_dir=tmp_path / victim.name
                )
            ]
            i = argv.index("--join-token")
            del argv[i : i + 2]
            topo.start_agent(victim, argv, env=env)
            _wait(lambda: _states(admin)[victim.name] == "up", "victim back up")
            kinds = [e.kind for e in admin.recent_events() if e.subject == victim.name]
            assert kinds == ["host.joined", "host.down", "host.up"]
            admin.close()

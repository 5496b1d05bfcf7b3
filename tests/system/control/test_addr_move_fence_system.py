"""Fenced moves on real agent processes (root): the new host starts applying only after
the old host finished, also with the push channel and prepare/commit.

A controller and two real agents in a 2-host topology; one record moves back and forth.
Each agent reports when its op started and how long it took on the machine's monotonic
clock (``started_s``, ``handled_s``; one clock for all processes here), so the order of
the two hosts' applies is read from the agents themselves, not from the controller.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edgevisor import Client
from edgevisor.control.agent_http import AgentHttp
from edgevisor.testing.controller import RunningController, running_controller
from edgevisor.testing.topology import Topology

pytestmark = pytest.mark.root


def wait_for(pred: Callable[[], Any], what: str, timeout_s: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (got := pred()):
        assert time.monotonic() < deadline, f"{what}: not reached within {timeout_s}s"
        time.sleep(0.2)
    return got


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Topology, RunningController, Client]]:
    with (
        Topology(2) as topo,
        running_controller(
            tmp_path / "ctl",
            {"network.reconcile_interval_s": 5.0},
            host=topo.controller_address,
        ) as ctl,
        Client(ctl.url, ctl.admin_token) as admin,
    ):
        port = int(ctl.url.rsplit(":", 1)[1])
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEVISOR_")} | {
            "EDGEVISOR_AGENT__HEARTBEAT_INTERVAL_S": "0.5",
            "EDGEVISOR_AGENT__LISTEN_HOST": "0.0.0.0",
            "EDGEVISOR_AGENT__LISTEN_PORT": "7451",
            "EDGEVISOR_NETWORK__INSTANCE_NETNS_PREFIX": f"{topo.prefix}-",
        }
        for h in topo.hosts:
            jt = admin.create_join_token(host=h.name).secret
            argv = topo.agent_argv(
                h, controller_port=port, join_token=jt, data_dir=tmp_path / h.name
            )
            argv = ["nsenter", f"--mount=/proc/{os.getpid()}/ns/mnt", "--", *argv]
            log = open(tmp_path / f"{h.name}.log", "ab")  # noqa: SIM115 - the process's
            topo.start_agent(h, argv, env=env, stdout=log, stderr=subprocess.STDOUT)
            log.close()
        wait_for(
            lambda: len([h for h in admin.list_hosts() if h.state == "up"]) == 2, "two hosts up"
        )
        yield topo, ctl, admin


def test_new_host_applies_after_the_old_host_on_real_agents(
    pair: tuple[Topology, RunningController, Client], monkeypatch: pytest.MonkeyPatch
) -> None:
    topo, _ctl, admin = pair
    assert topo.subnet is not None
    admin.create_physical_pool(str(list(topo.subnet.subnets(new_prefix=25))[1]))
    admin.create_account("acme")
    admin.create_network("net", "10.0.0.0/24", account="acme")
    h0, h1 = (h.name for h in topo.hosts)
    for addr, host in (("10.0.0.5", h0), ("10.0.0.7", h1)):
        admin.allocate_address("net", addr, account="acme")
        admin.bind_address(addr, f"i{addr[-1]}", host, account="acme")

    calls: list[tuple[str, str, dict[str, Any]]] = []  # (host, op, the agent's result)
    call0 = AgentHttp.call

    async def recording(self: AgentHttp, host: str, op: str, payload: Any, **kw: Any) -> Any:
        result = await call0(self, host, op, payload, **kw)
        calls.append((host, op, result if isinstance(result, dict) else {}))
        return result

    monkeypatch.setattr(AgentHttp, "call", recording)
    where = [h0, h1]
    admin.move_address("10.0.0.7", h0, account="acme")  # opens the channels
    time.sleep(1.0)
    by_commit = 0
    for k in range(8):
        calls.clear()
        src, dst = where[k % 2], where[(k + 1) % 2]
        moved = admin.move_address("10.0.0.7", dst, account="acme")
        assert moved.host == dst
        old = [r for h, op, r in calls if h == src and op == "records.apply"]
        new = [r for h, op, r in calls if h == dst and op in ("records.apply", "records.commit")]
        assert len(old) == 1 and new, calls
        ended = old[0]["started_s"] + old[0]["handled_s"]
        assert all(r["started_s"] > ended for r in new), (old, new)
        assert all(e["error"] is None for r in old + new for e in r["reports"])
        by_commit += any(op == "records.commit" for _h, op, _r in calls)
        time.sleep(0.05)
    assert by_commit >= 6, f"only {by_commit} of 8 moves went by prepare/commit"
    final = admin.get_address("10.0.0.7", account="acme")
    wait_for(
        lambda: all(not r.drift for r in admin.list_records(account="acme")),
        "no drift after the moves",
        30,
    )
    assert final.host == where[0]

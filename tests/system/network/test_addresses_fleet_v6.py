"""IPv6 logical addresses end to end, as a user would: a controller and two real agent
processes in host namespaces; instances of one account on different hosts reach each
other by IPv6 logical address and see each other's logical address.

The fabric carries IPv6 next to IPv4 (a /64 on each host's fabric interface); the IPv6
physical pool lies inside it. Before that pool exists, binding an IPv6 address is refused
with a reason that says what to add (translation is 1:1 within one family).
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from edgevisor import Client
from edgevisor.errors import NotFound
from edgevisor.network.netns import call_in, ip
from edgevisor.store import repos
from edgevisor.testing.controller import RunningController, running_controller
from edgevisor.testing.topology import Topology

pytestmark = pytest.mark.root
PORT = 7000


def wait_for(pred: Callable[[], Any], what: str, timeout_s: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached within {timeout_s}s")
        time.sleep(0.2)


def serve(name: str, netns: str, stop: threading.Event) -> socket.socket:
    """Answers each connection with "<name> <peer address it sees>"."""

    def listen() -> socket.socket:
        s = socket.socket(socket.AF_INET6)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("::", PORT))
        s.listen(8)
        s.settimeout(0.2)
        return s

    sock = call_in(netns, listen)

    def loop() -> None:
        while not stop.is_set():
            try:
                conn, peer = sock.accept()
            except (TimeoutError, OSError):
                continue
            with conn:
                conn.sendall(f"{name} {peer[0]}\n".encode())

    threading.Thread(target=loop, daemon=True).start()
    return sock


def hello(netns: str, dst: str) -> tuple[str, str, str] | None:
    try:
        with call_in(netns, lambda: socket.create_connection((dst, PORT), timeout=2)) as s:
            line = s.makefile("rb").readline().decode().split()
            return (s.getsockname()[0], line[0], line[1]) if len(line) == 2 else None
    except OSError:
        return None


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[tuple[Topology, RunningController, Client]]:
    with Topology(2) as topo, running_controller(
        tmp_path / "ctl", {"network.reconcile_interval_s": 0.5}, host=topo.controller_address
    ) as ctl:
        admin = Client(ctl.url, ctl.admin_token)
        port = int(ctl.url.rsplit(":", 1)[1])
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEVISOR_")} | {
            "EDGEVISOR_AGENT__HEARTBEAT_INTERVAL_S": "0.3",
            "EDGEVISOR_AGENT__LISTEN_HOST": "0.0.0.0",
            "EDGEVISOR_AGENT__LISTEN_PORT": "7451",
            "EDGEVISOR_NETWORK__INSTANCE_NETNS_PREFIX": f"{topo.prefix}-",
        }
        try:
            for h in topo.hosts:
                # The fabric's IPv6 side, inside the host namespaces the topology made.
                ip("-6", "addr", "add", f"fd00:fab::{h.index + 10}/64", "dev", "eth0",
                   "nodad", netns=h.netns)
                argv = topo.agent_argv(h, controller_port=port,
                                       join_token=admin.create_join_token(host=h.name).secret,
                                       data_dir=tmp_path / h.name)
                argv = ["nsenter", f"--mount=/proc/{os.getpid()}/ns/mnt", "--", *argv]
                with open(tmp_path / f"{h.name}.log", "ab") as log:
                    topo.start_agent(h, argv, env=env, stdout=log, stderr=subprocess.STDOUT)
            wait_for(lambda: len([h for h in admin.list_hosts() if h.state == "up"]) == 2,
                     "two hosts up", 60)
            yield topo, ctl, admin
        finally:
            admin.close()


def _op(ctl: RunningController, host: str, op: str, payload: dict[str, Any]) -> Any:
    with ctl.state.store.session() as s:
        h = repos.get_host(s, host)
        url, key = h.agent_url, h.agent_key
    r = httpx.post(f"{url}/agent/v1/ops/{op}", json=payload, timeout=30,
                   headers={"authorization": f"Bearer {key}"})
    assert r.status_code < 400, r.text
    return r.json().get("result")


def test_ipv6_instances_of_one_account_reach_each_other_across_hosts(
    fleet: tuple[Topology, RunningController, Client],
) -> None:
    topo, ctl, admin = fleet
    h0, h1 = (h.name for h in topo.hosts)
    admin.create_account("acme")
    admin.create_network("net6", "fd00:ac::/64", account="acme")
    admin.allocate_address("net6", "fd00:ac::5", account="acme")
    # No IPv6 physical pool yet: refused, with what to do about it; nothing changed.
    with pytest.raises(NotFound, match=r"IPv6 physical pool.*1:1"):
        admin.bind_address("fd00:ac::5", "a", h0, account="acme")
    assert admin.get_address("fd00:ac::5", account="acme").state == "allocated"

    admin.create_physical_pool("fd00:fab::1:0/112")
    admin.allocate_address("net6", "fd00:ac::7", account="acme")
    admin.bind_address("fd00:ac::5", "a", h0, account="acme")
    admin.bind_address("fd00:ac::7", "b", h1, account="acme")
    stop = threading.Event()
    socks = []
    try:
        ns = {}
        for name, host, addr in (("a", h0, "fd00:ac::5"), ("b", h1, "fd00:ac::7")):
            out = _op(ctl, host, "instances.create",
                      {"name": name, "account": "acme", "logical": addr})
            ns[name] = str(out["netns"])
            socks.append(serve(name, ns[name], stop))
        assert wait_for(lambda: hello(ns["a"], "fd00:ac::7"), "a reaches b by IPv6") == (
            "fd00:ac::5", "b", "fd00:ac::5")
        assert hello(ns["b"], "fd00:ac::5") == ("fd00:ac::7", "a", "fd00:ac::7")
        # record list: both hosts applied both records.
        wait_for(lambda: all(not r.drift and len(r.applied) == 2
                             for r in admin.list_records(account="acme")),
                 "both hosts applied the IPv6 records")
    finally:
        stop.set()
        for s in socks:
            s.close()

"""System tests of the simulated multi-host topology (real namespaces, veths, a bridge)."""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgevisor.testing.netns import ip, link_names, netns_list
from edgevisor.testing.topology import (
    AsyncTopology,
    Topology,
    TopologyError,
    leftovers,
)

pytestmark = pytest.mark.root

# Echo server in the root namespace: argv = bind address; prints the port, echoes lines.
ECHO_SERVER = textwrap.dedent(
    """
    import socket, sys, threading
    srv = socket.socket(); srv.bind((sys.argv[1], 0)); srv.listen(16)
    print(srv.getsockname()[1], flush=True)
    def serve(c):
        with c:
            while data := c.recv(4096):
                c.sendall(data)
    while True:
        c, _ = srv.accept()
        threading.Thread(target=serve, args=(c,), daemon=True).start()
    """
)

ECHO_CLIENT = textwrap.dedent(
    """
    import socket, sys
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10) as s:
        s.sendall(sys.argv[3].encode())
        print(s.recv(4096).decode())
    """
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait_dead(pid: int, timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


def _assert_gone(topo: Topology) -> None:
    assert leftovers(topo.prefix) == []
    names = netns_list()
    assert topo.fabric_netns not in names
    assert all(h.netns not in names for h in topo.hosts)
    assert topo.root_veth not in link_names()
    assert not any(n.startswith(topo.prefix) for n in ip("-o", "link").split())


@pytest.fixture
def echo_server() -> Iterator[tuple[Topology, int]]:
    with Topology(3) as topo:
        srv = subprocess.Popen(
            [sys.executable, "-I", "-c", ECHO_SERVER, topo.controller_address],
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            assert srv.stdout is not None
            port = int(srv.stdout.readline())
            yield topo, port
        finally:
            os.killpg(srv.pid, signal.SIGKILL)
            srv.wait(timeout=30)
            if srv.stdout is not None:
                srv.stdout.close()
    _assert_gone(topo)


def test_three_hosts_reach_each_other_and_the_controller(
    echo_server: tuple[Topology, int],
) -> None:
    topo, port = echo_server
    assert len(topo.hosts) == 3
    addrs = {h.address for h in topo.hosts}
    assert len(addrs) == 3
    assert topo.controller_address not in addrs
    subnet = topo.subnet
    assert subnet is not None
    assert all(ipaddress.IPv4Address(a) in subnet for a in [*addrs, topo.controller_address])
    for h in topo.hosts:
        for other in topo.hosts:
            if other is not h:
                assert h.ping(other.address), f"{h.name} -> {other.name}"
        assert h.ping(topo.controller_address), f"{h.name} -> controller"
        out = h.exec(
            [sys.executable, "-I", "-c", ECHO_CLIENT, topo.controller_address, str(port), h.name]
        )
        assert out.stdout.strip() == h.name
    # Nothing outside the fabric is routable from a host (asked of the routing table
    # only; no packet is sent).
    nowhere = topo.hosts[0].exec(["ip", "route", "get", "192.0.2.1"], check=False)
    assert nowhere.returncode != 0 and "unreachable" in nowhere.stderr.lower()


def test_root_namespace_gets_only_the_fabric_route() -> None:
    before = ip("-4", "route", "show").splitlines()
    with Topology(1) as topo:
        after = ip("-4", "route", "show").splitlines()
        added = [r.strip() for r in after if r not in before]
        assert added == [
            f"{topo.subnet} dev {topo.root_veth} proto kernel scope link "
            f"src {topo.controller_address}"
        ]
        host_routes = topo.hosts[0].exec(["ip", "-4", "route", "show"]).stdout.splitlines()
        assert [r.strip() for r in host_routes] == [
            f"{topo.subnet} dev eth0 proto kernel scope link src {topo.hosts[0].address}"
        ]
        assert "UP" in topo.hosts[0].exec(["ip", "-o", "link", "show", "lo"]).stdout
    assert ip("-4", "route", "show").splitlines() == before


def test_teardown_after_exception_kills_processes_and_removes_everything() -> None:
    with pytest.raises(RuntimeError, match="boom"), Topology(2) as topo:
        sleeper = topo.hosts[1].run(["sleep", "1000"])
        # A grandchild that leaves the process group still dies: it is in our namespace.
        escaped = topo.hosts[0].exec(
            ["sh", "-c", "setsid sleep 1000 >/dev/null 2>&1 < /dev/null & echo $!"]
        )
        escaped_pid = int(escaped.stdout.strip())
        assert _alive(escaped_pid)
        raise RuntimeError("boom")
    assert sleeper.poll() is not None
    assert _wait_dead(escaped_pid)
    _assert_gone(topo)


def test_two_topologies_at_once_get_distinct_names_and_subnets() -> None:
    with Topology(1) as a, Topology(1) as b:
        assert a.prefix != b.prefix
        assert a.subnet != b.subnet
        assert a.hosts[0].ping(a.controller_address)
        assert b.hosts[0].ping(b.controller_address)
        # The fabrics are separate: a's host cannot reach b's controller address.
        assert not a.hosts[0].ping(b.controller_address, timeout_s=0.5)
    _assert_gone(a)
    _assert_gone(b)


def test_bad_arguments_are_refused_before_anything_is_created() -> None:
    with pytest.raises(TopologyError):
        Topology(0)
    with pytest.raises(TopologyError):
        Topology(1, prefix="much-too-long-prefix")
    with pytest.raises(TopologyError):
        Topology(2, host_names=["a", "a"])


def test_requested_subnet_overlapping_root_network_fails_and_cleans_up() -> None:
    # 127.0.0.0/24 lies inside lo's 127.0.0.1/8, which every root namespace has.
    clash = "127.0.0.0/24"
    prefix = f"evq{os.getpid():x}"
    with pytest.raises(TopologyError, match="overlaps"), Topology(1, prefix=prefix, subnet=clash):
        pass
    assert leftovers(prefix) == []


async def test_async_variant() -> None:
    async with AsyncTopology(2) as topo:
        assert topo.hosts[0].ping(topo.hosts[1].address)
    _assert_gone(topo)

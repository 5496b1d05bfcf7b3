"""System tests of the flow fence's conntrack cleanup, on both of its paths.

The cleanup deletes the entries a commit fenced (see "Old flows" in ``dataplane.py``):
by one kernel-filtered delete per address and side (``conntrack_path="kernel"``, Linux
>= 6.12) or by one dump matched in Python (``"dump"``, the fallback for older kernels and
IPv6). Either way: a flow opened before a remap is cut at the commit and its entry goes
with the cleanup; a flow opened after the commit survives the cleanup; and a key fenced
twice before its cleanup ran has the first cleanup run by the second commit.
"""

from __future__ import annotations

import os
import secrets
import socket
import struct
import subprocess
from collections.abc import Iterator
from ipaddress import IPv4Address
from typing import Literal

import pytest
from net_echo_helpers import EchoServer, connect, eventually, hello

from edgevisor.network.dataplane import AppliedRecord, Dataplane, DataplaneSettings
from edgevisor.network.netns import Fabric, Instance

pytestmark = pytest.mark.root

A = IPv4Address
SETTINGS = DataplaneSettings(fabric_if="fab0")
CtPath = Literal["kernel", "dump"]


def rec(logical: str, physical: str, host: int, gen: int) -> AppliedRecord:
    return AppliedRecord("acct1", A(logical), A(physical), f"h{host}", gen)


class Net:
    """Three hosts; instance a (10.0.0.5) on h1 talks to b (10.0.0.7) on h2, b's address
    moves to h3 (b2) and back to h2."""

    def __init__(self, path: CtPath) -> None:
        self.fabric = Fabric(f"evfc{os.getpid() % 10000}{secrets.token_hex(2)}")
        self.servers: list[EchoServer] = []
        self.dps: dict[int, Dataplane] = {}
        for i in (1, 2, 3):
            self.fabric.add_host(i)
            self.dps[i] = Dataplane(
                f"h{i}",
                SETTINGS,
                netns=self.fabric.host_ns(i),
                conntrack_path=path if i == 1 else "auto",
            )
        self.a = self.fabric.add_instance("a", 1, "acct1", A("10.0.0.5"))
        insts = {
            2: self.fabric.add_instance("b", 2, "acct1", A("10.0.0.7")),
            3: self.fabric.add_instance("b2", 3, "acct1", A("10.0.0.7")),
        }
        for host, inst in insts.items():
            self.serve(f"b@h{host}", inst)
        base = [rec("10.0.0.5", "10.250.1.5", 1, 1), rec("10.0.0.7", "10.250.1.7", 2, 2)]
        for dp in self.dps.values():
            dp.rebuild(base)

    def serve(self, name: str, inst: Instance) -> None:
        self.servers.append(EchoServer(name, inst.netns).start())

    def close(self) -> None:
        for s in self.servers:
            s.stop()
        for dp in self.dps.values():
            dp.close()
        self.fabric.destroy()

    def move(self, host: int, physical: str, gen: int) -> AppliedRecord:
        """b's record to ``host``: applied on every host but h1 (the test drives h1)."""
        r = rec("10.0.0.7", physical, host, gen)
        for i in (2, 3):
            self.dps[i].apply([r])
        return r

    def entries(self, sport: int) -> int:
        """h1's conntrack entries of the TCP flow from ``sport``."""
        out = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                self.fabric.host_ns(1),
                "conntrack",
                "-L",
                "-p",
                "tcp",
                "--sport",
                str(sport),
            ],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        return sum(1 for line in out.splitlines() if f"sport={sport} " in line)

    def answered_by(self) -> str | None:
        got = hello(self.a.netns, A("10.0.0.7"), timeout=2)
        return got[1] if got else None


@pytest.fixture(params=["kernel", "dump"])
def net(request: pytest.FixtureRequest) -> Iterator[Net]:
    n = Net(request.param)
    try:
        yield n
    finally:
        n.close()


def opened(net: Net, expect: str) -> tuple[socket.socket, int]:
    """A flow from a to 10.0.0.7, answered by ``expect``: (socket, source port)."""
    assert eventually(lambda: net.answered_by() == expect)
    s = connect(net.a.netns, A("10.0.0.7"))
    s.settimeout(5)
    assert s.makefile("rb").readline().split()[0] == expect.encode()
    return s, s.getsockname()[1]


def cut(s: socket.socket) -> bool:
    """True when the flow gets no answer (the fence drops it, or the peer resets it).
    The socket is then aborted: its retransmissions would otherwise come back after the
    cleanup as a new entry (conntrack picks up TCP mid-stream) and muddle the count."""
    s.settimeout(2)
    try:
        s.sendall(b"again\n")
        got = not s.recv(100)
    except OSError:
        got = True
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
    return got


def alive(s: socket.socket, expect: str) -> bool:
    s.sendall(b"ping\n")
    return s.recv(100) == f"{expect} ping\n".encode()


def test_old_flow_cut_and_deleted_new_flow_survives_the_cleanup(net: Net) -> None:
    dp = net.dps[1]
    old, old_port = opened(net, "b@h2")
    moved = net.move(3, "10.250.3.7", 3)
    pending = dp.commit([moved])
    # h2 still translates for b, so only h1's fence stops the old flow.
    assert cut(old)
    assert net.entries(old_port) == 1  # fenced, not yet deleted
    new, new_port = opened(net, "b@h3")

    deleted, warning = dp.flush_stale_many([pending])
    assert warning is None and deleted >= 1
    assert dp._ct.last_path == ("kernel" if dp._ct.path == "kernel" else "dump")
    assert net.entries(old_port) == 0  # the fenced flow's entry went
    assert net.entries(new_port) == 1  # opened after the commit: kept
    assert alive(new, "b@h3")
    dp.flushed(pending)
    dp.apply([])
    assert dp.stale == {}
    new.close()


def test_fences_before_a_cleanup_are_cleaned_together_or_first_when_a_phase_returns(
    net: Net,
) -> None:
    """b moves h2 -> h3 -> h2 -> h3 -> h2 before h1's cleanup ran: each commit cuts the
    flow opened since the one before; the fourth brings b's keys back to the phase of the
    first and runs the first fence's cleanup itself; one cleanup of all four commits then
    deletes every fenced flow and keeps the flow opened after the last."""
    dp = net.dps[1]
    hosts = [(3, "10.250.3.7", "b@h3"), (2, "10.250.1.7", "b@h2")] * 2
    flows = [opened(net, "b@h2")]
    pendings = []
    for gen, (host, physical, expect) in enumerate(hosts, 3):
        pendings.append(dp.commit([net.move(host, physical, gen)]))
        assert cut(flows[-1][0])
        flows.append(opened(net, expect))
    assert [bool(p.batch.refence) for p in pendings] == [False, False, False, True]
    assert net.entries(flows[0][1]) == 0  # cleaned by the fourth commit
    assert all(net.entries(port) == 1 for _s, port in flows[1:])

    deleted, warning = dp.flush_stale_many(pendings)
    assert warning is None and deleted >= 3
    assert [net.entries(port) for _s, port in flows] == [0, 0, 0, 0, 1]
    assert alive(flows[-1][0], "b@h2")
    for p in pendings:
        dp.flushed(p)
    dp.apply([])
    assert dp.stale == {}
    for s, _port in flows:
        s.close()


def test_a_dataplane_opens_over_a_table_of_the_epoch_fence_and_replaces_it() -> None:
    """Upgrade: the table an agent of the epoch fence left (an ``epoch`` map, an interval
    ``stale`` set) holds nothing the phase fence reads back; the rebuild replaces it, and
    its flows (epoch marks, far below bit 28) read as phase 0."""
    fabric = Fabric(f"evfu{os.getpid() % 10000}{secrets.token_hex(2)}")
    try:
        ns = fabric.add_host(1)
        old = (
            "table ip edgevisor {\n"
            "  map epoch { typeof meta protocol : ct mark; elements = { ip : 7 } }\n"
            "  set stale { typeof ct zone . ct original ip saddr . ct mark; flags interval;\n"
            "    elements = { 1 . 10.0.0.5 . 0-6 } }\n"
            "}\n"
        )
        subprocess.run(
            ["ip", "netns", "exec", ns, "nft", "-f", "-"], input=old, text=True, check=True
        )
        dp = Dataplane("h1", SETTINGS, netns=ns)
        try:
            assert dp.phase == {} and dp.stale == {}
            dp.rebuild([rec("10.0.0.5", "10.250.1.5", 1, 1)])
            dp.apply([rec("10.0.0.5", "10.250.2.5", 2, 2)])
            elements = dp.table_elements()
            assert "epoch" not in elements
            assert len(elements["stale"]) == 2 and len(elements["phase_a"]) == 2
        finally:
            dp.close()
    finally:
        fabric.destroy()

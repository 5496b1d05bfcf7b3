"""IPv6 through the host dataplane on simulated hosts (network namespaces).

Three host namespaces on one bridge; the fabric carries IPv6 (a /64 on each host's
fabric interface, as the IPv4 fabric has its /16), and the IPv6 physical addresses are
/128s inside it. Instances are IPv6 namespaces behind veths (``fe80::1`` gateway). Two
instances of one account on different hosts reach each other by logical address and see
logical addresses; another account with the same logical address cannot reach them; a
remap to another host cuts the open flow (conntrack cleared, IPv6 entries) and new
connections reach the new host; a physical address that moves between hosts is
announced with an unsolicited neighbour advertisement.
"""

from __future__ import annotations

import json
import secrets
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv6Address

import pytest
from net_echo_helpers import EchoServer
from net_echo_helpers import connect as echo_connect
from net_echo_helpers import hello as echo_hello

from edgevisor.network.dataplane import AppliedRecord, Dataplane, DataplaneSettings
from edgevisor.network.netns import Fabric, Instance, ip

pytestmark = pytest.mark.root

A = IPv6Address
PORT = 7000
SETTINGS = DataplaneSettings(fabric_if="fab0")


def phys(n: int) -> IPv6Address:
    return A(f"fd00:fab::1:{n:x}")


def connect(inst: Instance, dst: IPv6Address, timeout: float = 3.0) -> socket.socket:
    return echo_connect(inst.netns, dst, timeout)


def hello(inst: Instance, dst: IPv6Address) -> tuple[str, str, str] | None:
    return echo_hello(inst.netns, dst)


@dataclass
class Net6:
    fabric: Fabric
    dps: dict[str, Dataplane]
    echos: list[EchoServer]


@pytest.fixture
def net6() -> Iterator[Net6]:
    fabric = Fabric(f"ev6{secrets.token_hex(3)}", subnet="10.252")
    dps: dict[str, Dataplane] = {}
    echos: list[EchoServer] = []
    try:
        for i in (1, 2, 3):
            ns = fabric.add_host(i)
            ip("-6", "addr", "add", f"fd00:fab::{i}/64", "dev", "fab0", "nodad", netns=ns)
            dps[f"h{i}"] = Dataplane(f"h{i}", SETTINGS, netns=ns)
            dps[f"h{i}"].rebuild([])  # the tables, as an agent makes them at start
        yield Net6(fabric, dps, echos)
    finally:
        for e in echos:
            e.stop()
        for dp in dps.values():
            dp.close()
        fabric.destroy()


def apply_everywhere(n: Net6, records: list[AppliedRecord]) -> None:
    for dp in n.dps.values():
        dp.apply(records)


def test_ipv6_instances_reach_each_other_by_logical_address(net6: Net6) -> None:
    f = net6.fabric
    a = f.add_instance("a", 1, "acme", A("fd00:ac::5"))
    b = f.add_instance("b", 2, "acme", A("fd00:ac::7"))
    x = f.add_instance("x", 3, "globex", A("fd00:ac::5"))  # same logical, other account
    for inst, name in ((a, "a"), (b, "b"), (x, "x")):
        net6.echos.append(EchoServer(name, inst.netns, family=socket.AF_INET6).start())
    recs = [AppliedRecord("acme", A("fd00:ac::5"), phys(5), "h1", 1),
            AppliedRecord("acme", A("fd00:ac::7"), phys(7), "h2", 1),
            AppliedRecord("globex", A("fd00:ac::5"), phys(9), "h3", 1)]
    apply_everywhere(net6, recs)
    elems = net6.dps["h1"].table_elements()
    assert elems.get("in_dnat6") and not elems.get("in_dnat")  # the ip6 table holds them

    # Both ends see logical addresses only.
    assert hello(a, A("fd00:ac::7")) == ("fd00:ac::5", "b", "fd00:ac::5")
    assert hello(b, A("fd00:ac::5")) == ("fd00:ac::7", "a", "fd00:ac::7")
    # globex's instance has acme's logical address but is not acme: no path either way.
    assert hello(x, A("fd00:ac::7")) is None
    assert hello(b, A("fd00:ac::5"))[1] == "a"  # type: ignore[index]

    # Remap: b's record moves to h3 with a new physical address; a new instance there.
    flow = connect(a, A("fd00:ac::7"))
    reader = flow.makefile("rb")
    assert reader.readline().split()[0] == b"b"
    b2 = f.add_instance("b2", 3, "acme", A("fd00:ac::7"))
    net6.echos.append(EchoServer("b2", b2.netns, family=socket.AF_INET6).start())
    moved = AppliedRecord("acme", A("fd00:ac::7"), phys(17), "h3", 2)
    for dp in (net6.dps["h2"], net6.dps["h1"], net6.dps["h3"]):  # old host first
        dp.apply([moved])
    assert hello(a, A("fd00:ac::7")) == ("fd00:ac::5", "b2", "fd00:ac::5")
    # The flow opened to the old mapping does not keep reaching the old host.
    flow.settimeout(2.0)
    try:
        flow.sendall(b"still there?\n")
        answer = reader.readline()
    except OSError:
        answer = b""
    assert not answer.startswith(b"b "), answer
    flow.close()

    # The record goes back to h2 keeping its physical address (freed addresses are
    # reused): h1 still has a neighbour entry for it with h3's MAC, and only h2's
    # unsolicited neighbour advertisement (Override) makes it send to h2 at once (neighbour
    # unreachability detection would take 5 s and more).
    h1, h2, h3 = (f.host_ns(i) for i in (1, 2, 3))
    assert neighbour(h1, phys(17)) == mac(h3)
    back = AppliedRecord("acme", A("fd00:ac::7"), phys(17), "h2", 3)
    for dp in (net6.dps["h3"], net6.dps["h1"], net6.dps["h2"]):  # old host first
        dp.apply([back])
    assert neighbour(h1, phys(17)) == mac(h2)  # before any packet: the advertisement
    assert hello(a, A("fd00:ac::7")) == ("fd00:ac::5", "b", "fd00:ac::5")


def mac(netns: str) -> str:
    return str(json.loads(ip("-j", "link", "show", "fab0", netns=netns))[0]["address"])


def neighbour(netns: str, address: IPv6Address) -> str | None:
    got = json.loads(ip("-j", "-6", "neigh", "show", str(address), "dev", "fab0",
                        netns=netns) or "[]")
    return str(got[0]["lladdr"]) if got and "lladdr" in got[0] else None


def test_ipv6_open_flow_is_fenced_at_the_commit(net6: Net6) -> None:
    """As for IPv4: the peer's commit alone (no conntrack flush yet, the old host not
    updated at all) stops a flow opened to the old mapping; new connections pass."""
    f = net6.fabric
    a = f.add_instance("a", 1, "acme", A("fd00:ac::5"))
    b = f.add_instance("b", 2, "acme", A("fd00:ac::7"))
    net6.echos.append(EchoServer("b", b.netns, family=socket.AF_INET6).start())
    recs = [AppliedRecord("acme", A("fd00:ac::5"), phys(5), "h1", 1),
            AppliedRecord("acme", A("fd00:ac::7"), phys(7), "h2", 1)]
    apply_everywhere(net6, recs)
    flow = connect(a, A("fd00:ac::7"))
    reader = flow.makefile("rb")
    assert reader.readline().split()[0] == b"b"
    b2 = f.add_instance("b2", 3, "acme", A("fd00:ac::7"))
    net6.echos.append(EchoServer("b2", b2.netns, family=socket.AF_INET6).start())
    moved = AppliedRecord("acme", A("fd00:ac::7"), phys(17), "h3", 2)
    pending = net6.dps["h1"].commit([moved])
    net6.dps["h3"].apply([moved])
    flow.settimeout(2.0)
    try:
        flow.sendall(b"still there?\n")
        answer = reader.readline()
    except OSError:
        answer = b""
    assert not answer.startswith(b"b "), answer
    flow.close()
    assert hello(a, A("fd00:ac::7")) == ("fd00:ac::5", "b2", "fd00:ac::5")
    assert net6.dps["h1"].finish(pending).conntrack_deleted >= 1
    assert hello(a, A("fd00:ac::7")) == ("fd00:ac::5", "b2", "fd00:ac::5")

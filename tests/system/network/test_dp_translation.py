"""System tests of the host dataplane on simulated hosts (network namespaces).

Three host namespaces on one bridge; instances are namespaces behind veths. Servers and
clients run in this process: a socket created in a thread that entered a namespace stays
in that namespace.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
from collections.abc import Iterator
from ipaddress import IPv4Address

import pytest
from net_echo_helpers import EchoServer, eventually
from net_echo_helpers import connect as echo_connect
from net_echo_helpers import hello as echo_hello

from edgevisor.network.dataplane import (
    AppliedRecord,
    ApplyFailed,
    Dataplane,
    DataplaneSettings,
)
from edgevisor.network.netns import Fabric, Instance, call_in

pytestmark = pytest.mark.root

A = IPv4Address
PORT = 7000
SETTINGS = DataplaneSettings(fabric_if="fab0")


def connect(inst: Instance, dst: IPv4Address, timeout: float = 3.0) -> socket.socket:
    return echo_connect(inst.netns, dst, timeout)


def hello(inst: Instance, dst: IPv4Address, timeout: float = 3.0) -> tuple[str, str, str]:
    """Connect; return (own address seen locally, server name, peer address it saw)."""
    got = echo_hello(inst.netns, dst, timeout)
    assert got is not None, f"{inst.netns} cannot reach {dst}"
    return got


def unreachable(inst: Instance, dst: IPv4Address, port: int = PORT) -> bool:
    try:
        call_in(inst.netns, lambda: socket.create_connection((str(dst), port), timeout=1.5))
    except OSError:
        return True
    return False


class World:
    def __init__(self) -> None:
        self.fabric = Fabric(f"evdp{os.getpid() % 10000}{secrets.token_hex(2)}")
        self.dps: dict[int, Dataplane] = {}
        self.servers: list[EchoServer] = []

    def setup(self, hosts: int = 3) -> None:
        for i in range(1, hosts + 1):
            self.fabric.add_host(i)
            self.dps[i] = Dataplane(f"h{i}", SETTINGS, netns=self.fabric.host_ns(i))

    def serve(self, name: str, inst: Instance) -> EchoServer:
        srv = EchoServer(name, inst.netns).start()
        self.servers.append(srv)
        return srv

    def close(self) -> None:
        for s in self.servers:
            s.stop()
        for dp in self.dps.values():
            dp.close()
        self.fabric.destroy()


@pytest.fixture
def world() -> Iterator[World]:
    w = World()
    try:
        w.setup()
        yield w
    finally:
        w.close()


def rec(account: str, logical: str, physical: str, host: int, gen: int,
        state: str = "active") -> AppliedRecord:
    return AppliedRecord(account, A(logical), A(physical), f"h{host}", gen, state)  # type: ignore[arg-type]


def base_records() -> list[AppliedRecord]:
    return [
        rec("acct1", "10.0.0.5", "10.250.1.5", 1, 1),   # a
        rec("acct1", "10.0.0.7", "10.250.1.7", 2, 2),   # b
        rec("acct2", "10.0.0.7", "10.250.2.7", 1, 3),   # y: overlaps b, same host as a
        rec("acct2", "10.0.0.9", "10.250.2.9", 3, 4),   # x
    ]


def build(world: World) -> dict[str, Instance]:
    f = world.fabric
    insts = {
        "a": f.add_instance("a", 1, "acct1", A("10.0.0.5")),
        "b": f.add_instance("b", 2, "acct1", A("10.0.0.7")),
        "y": f.add_instance("y", 1, "acct2", A("10.0.0.7")),
        "x": f.add_instance("x", 3, "acct2", A("10.0.0.9")),
    }
    for dp in world.dps.values():
        result = dp.rebuild(base_records())
        assert result.generation == 4
        assert result.warnings == ()
    for name, inst in insts.items():
        world.serve(name, inst)
    return insts


def test_same_account_reaches_peer_by_logical_address_both_ends_see_logical(
    world: World,
) -> None:
    i = build(world)
    own, name, seen = hello(i["a"], A("10.0.0.7"))
    assert (own, name, seen) == ("10.0.0.5", "b", "10.0.0.5")
    own, name, seen = hello(i["b"], A("10.0.0.5"))
    assert (own, name, seen) == ("10.0.0.7", "a", "10.0.0.7")
    # acct2 has its own 10.0.0.7 (y, on a's host): x reaches y, not b.
    own, name, seen = hello(i["x"], A("10.0.0.7"))
    assert (own, name, seen) == ("10.0.0.9", "y", "10.0.0.9")
    own, name, seen = hello(i["y"], A("10.0.0.9"))
    assert (own, name, seen) == ("10.0.0.7", "x", "10.0.0.7")


def test_other_account_cannot_reach_even_with_overlapping_range(world: World) -> None:
    i = build(world)
    assert unreachable(i["x"], A("10.0.0.5"))  # acct1's a: not in acct2's records
    assert unreachable(i["y"], A("10.0.0.5"))  # same host as a, other account
    assert unreachable(i["a"], A("10.0.0.9"))  # acct2's x
    # Straight at physical and host addresses: no path either.
    assert unreachable(i["x"], A("10.250.1.5"))
    assert unreachable(i["x"], A("10.250.0.1"))
    # The same-host, same-account path still works meanwhile.
    assert hello(i["x"], A("10.0.0.7"))[1] == "y"


def test_instances_have_no_path_to_host_services_unless_granted(world: World) -> None:
    i = build(world)
    host_ns = world.fabric.host_ns(1)
    srv = EchoServer("host", host_ns, port=7001).start()
    granted = EchoServer("granted", host_ns, port=7002).start()
    world.servers += [srv, granted]
    dp = world.dps[1]
    dp.close()
    world.dps[1] = Dataplane("h1", DataplaneSettings(fabric_if="fab0", granted_tcp_ports=(7002,)),
                             netns=host_ns)
    world.dps[1].rebuild(base_records())
    gw = A("169.254.0.1")
    assert unreachable(i["a"], gw, 7001)
    assert unreachable(i["a"], world.fabric.host_address(1), 7001)

    def granted_hello() -> str:
        with call_in(i["a"].netns,
                     lambda: socket.create_connection((str(gw), 7002), timeout=3)) as s:
            return s.makefile("rb").readline().decode().split()[0]

    assert granted_hello() == "granted"


def test_remap_moves_new_connections_and_cuts_open_flow(world: World) -> None:
    i = build(world)
    old = connect(i["a"], A("10.0.0.7"))
    rf = old.makefile("rb")
    assert rf.readline().split()[0] == b"b"
    old.sendall(b"ping\n")
    assert rf.readline() == b"b ping\n"

    # b's address moves to h3 with a new physical, under a new instance. h2 lags behind
    # (its instance and mapping are still there), so without the conntrack flush on h1
    # the open flow would keep being answered by b on h2.
    b2 = world.fabric.add_instance("b2", 3, "acct1", A("10.0.0.7"))
    world.serve("b2", b2)
    moved = rec("acct1", "10.0.0.7", "10.250.3.7", 3, 5)
    r1 = world.dps[1].apply([moved])
    r3 = world.dps[3].apply([moved])
    assert (r1.generation, r3.generation) == (5, 5)
    assert r1.conntrack_deleted >= 1  # the open flow's entry on h1

    # New connections reach the new host and see logical addresses.
    assert eventually(lambda: _try_hello(i["a"]) == ("10.0.0.5", "b2", "10.0.0.5"))
    # The open flow does not keep reaching the old mapping: the new host has no such
    # connection and resets it.
    old.settimeout(5)
    with pytest.raises(OSError):
        old.sendall(b"again\n")
        line = rf.readline()
        if not line:
            raise ConnectionResetError("closed")
        raise AssertionError(f"old flow still answered: {line!r}")
    old.close()

    # The old host catches up: its entries of the mapping go too.
    r2 = world.dps[2].apply([moved])
    assert r2.generation == 5
    assert r2.conntrack_deleted >= 1
    assert hello(i["a"], A("10.0.0.7"))[1] == "b2"


def test_commit_fences_the_open_flow_before_the_conntrack_flush(world: World) -> None:
    """The old flow stops at the commit itself (its keys move to the next phase and the
    old one is stale, in the same transaction), not when the conntrack cleanup runs; a
    flow opened in between survives the cleanup."""
    i = build(world)
    old = connect(i["a"], A("10.0.0.7"))
    rf = old.makefile("rb")
    assert rf.readline().split()[0] == b"b"
    old.sendall(b"ping\n")
    assert rf.readline() == b"b ping\n"

    b2 = world.fabric.add_instance("b2", 3, "acct1", A("10.0.0.7"))
    world.serve("b2", b2)
    moved = rec("acct1", "10.0.0.7", "10.250.3.7", 3, 5)
    pending = world.dps[1].commit([moved])  # no finish: no conntrack flush yet
    world.dps[3].apply([moved])
    # h2, the old host, lags and still translates for b: only the fence on h1 stops it.
    old.settimeout(2)
    with pytest.raises(OSError):
        old.sendall(b"again\n")
        line = rf.readline()
        if not line:
            raise ConnectionResetError("closed")
        raise AssertionError(f"old flow still answered before the flush: {line!r}")
    old.close()

    assert eventually(lambda: _try_hello(i["a"]) == ("10.0.0.5", "b2", "10.0.0.5"))
    new = connect(i["a"], A("10.0.0.7"))
    nf = new.makefile("rb")
    assert nf.readline().split()[0] == b"b2"

    res = world.dps[1].finish(pending)
    assert res.conntrack_deleted >= 1  # the fenced flow's entry
    new.sendall(b"ping\n")  # opened after the commit: not flushed
    assert nf.readline() == b"b2 ping\n"
    new.close()

    # The next transaction drops the fence elements whose flush is done.
    assert world.dps[1].stale
    world.dps[1].apply([])
    assert world.dps[1].stale == {}
    elements = world.dps[1].table_elements()
    assert elements["stale"] == []
    assert len(elements["phase_a"]) == 2  # the old mapping's keys stay in phase 1


def _ct_entries(dp: Dataplane, sport: int) -> int:
    """Conntrack entries in ``dp``'s namespace of the TCP flow from source port ``sport``."""
    assert dp.netns is not None
    out = subprocess.run(
        ["ip", "netns", "exec", dp.netns, "conntrack", "-L", "-p", "tcp", "--sport", str(sport)],
        capture_output=True, text=True, check=False,
    ).stdout
    return sum(1 for line in out.splitlines() if f"sport={sport} " in line)


def test_one_cleanup_of_two_commits_keeps_each_commits_fence(world: World) -> None:
    """The agent cleans up the commits of a short window at once (``flush_stale_many``):
    each key is cleaned for its own fence's stale phase, so a flow opened after the first
    commit to its (new) mapping survives the second commit's cleanup, while the flow the
    first commit fenced goes."""
    i = build(world)
    old = connect(i["a"], A("10.0.0.7"))
    rf = old.makefile("rb")
    assert rf.readline().split()[0] == b"b"

    b2 = world.fabric.add_instance("b2", 3, "acct1", A("10.0.0.7"))
    world.serve("b2", b2)
    moved = rec("acct1", "10.0.0.7", "10.250.3.7", 3, 5)
    p1 = world.dps[1].commit([moved])
    world.dps[3].apply([moved])
    world.dps[1].finish_links(p1)
    assert eventually(lambda: _try_hello(i["a"]) == ("10.0.0.5", "b2", "10.0.0.5"))
    new = connect(i["a"], A("10.0.0.7"))  # carries the new phase of p1's keys
    nf = new.makefile("rb")
    assert nf.readline().split()[0] == b"b2"

    # Another record (acct2's x) changes: a second commit, other keys.
    x_moved = rec("acct2", "10.0.0.9", "10.250.3.9", 3, 6)
    p2 = world.dps[1].commit([x_moved])
    world.dps[1].finish_links(p2)
    assert p2.batch.flush and p2.batch.epoch == p1.batch.epoch + 1

    port = new.getsockname()[1]
    assert _ct_entries(world.dps[1], port) == 1
    deleted, warning = world.dps[1].flush_stale_many([p1, p2])
    assert warning is None
    assert deleted >= 1  # the flow p1 fenced
    # Opened after p1: it carries the new phase; its entry stays.
    assert _ct_entries(world.dps[1], port) == 1
    new.sendall(b"ping\n")
    assert nf.readline() == b"b2 ping\n"
    new.close()
    old.close()
    world.dps[1].flushed(p1)
    world.dps[1].flushed(p2)
    world.dps[1].apply([])
    assert world.dps[1].stale == {}


def test_a_new_dataplane_continues_the_fence_of_the_kernel_table(world: World) -> None:
    """An agent restart keeps the kernel table and its flows: the new process reads the
    ``phase`` keys and the pending stale keys back, its rebuild keeps them (flows carry
    their phase bits) and runs the pending cleanup: the fenced flow's entry goes, the
    stale element with the next commit."""
    i = build(world)
    dp = world.dps[1]
    b2 = world.fabric.add_instance("b2", 3, "acct1", A("10.0.0.7"))
    world.serve("b2", b2)
    moved = rec("acct1", "10.0.0.7", "10.250.3.7", 3, 5)
    dp.apply([moved])  # fenced and cleaned
    world.dps[3].apply([moved])
    assert eventually(lambda: _try_hello(i["a"]) == ("10.0.0.5", "b2", "10.0.0.5"))
    old = connect(i["a"], A("10.0.0.7"))
    assert old.makefile("rb").readline().split()[0] == b"b2"
    port = old.getsockname()[1]
    assert _ct_entries(dp, port) == 1
    dp.commit([rec("acct1", "10.0.0.7", "10.250.2.77", 2, 6)])  # fenced, not cleaned
    phase, stale = dict(dp.phase), set(dp.stale)
    # 10.0.0.7 fenced twice (phase 2), 10.250.1.7 and 10.250.3.7 once (phase 1).
    assert phase == {(1, A("10.0.0.7")): 2, (1, A("10.250.1.7")): 1, (1, A("10.250.3.7")): 1}
    assert stale == {((1, A("10.0.0.7")), 1), ((1, A("10.250.3.7")), 0)}
    dp.close()
    world.dps[1] = again = Dataplane("h1", SETTINGS, netns=world.fabric.host_ns(1))
    assert again.phase == phase and set(again.stale) == stale and not again.stale_done
    res = again.rebuild([*base_records()[:1], *base_records()[2:],
                         rec("acct1", "10.0.0.7", "10.250.2.77", 2, 6)])
    assert again.phase == phase and again.stale_done == stale
    elements = again.table_elements()
    in_a = {(e["concat"][0], e["concat"][1]) for e in elements["phase_a"]}
    in_b = {(e["concat"][0], e["concat"][1]) for e in elements["phase_b"]}
    assert in_a == {(z, str(a)) for (z, a), ph in phase.items() if ph & 1}
    assert in_b == {(z, str(a)) for (z, a), ph in phase.items() if ph & 2}
    assert res.warnings == () and _ct_entries(again, port) == 0
    again.apply([])
    assert again.stale == {} and again.table_elements()["stale"] == []
    old.close()


def _try_hello(inst: Instance) -> tuple[str, str, str] | None:
    return echo_hello(inst.netns, A("10.0.0.7"), timeout=2)


def test_failed_apply_keeps_last_good_table(world: World) -> None:
    i = build(world)
    dp = world.dps[1]
    before = dp.table_elements()
    records_before = dict(dp.records)
    # A second local record claiming a's physical address: the kernel refuses the batch.
    clash = rec("acct1", "10.0.0.6", "10.250.1.5", 1, 9)
    also = rec("acct1", "10.0.0.8", "10.250.1.8", 2, 10)  # valid, but in the same batch
    with pytest.raises(ApplyFailed) as err:
        dp.apply([also, clash])
    assert "exists" in err.value.message.lower()
    assert dp.table_elements() == before
    assert dp.records == records_before
    assert dp.generation == 4
    assert dp.last_error
    assert hello(i["a"], A("10.0.0.7"))[1] == "b"
    # The next good update applies.
    assert dp.apply([also]).generation == 10
    assert dp.last_error is None


def test_rebuild_after_restart_restores_translation(world: World) -> None:
    i = build(world)
    world.dps[1].close()
    # A fresh Dataplane knows nothing; rebuild from records replaces whatever is there.
    world.dps[1] = Dataplane("h1", SETTINGS, netns=world.fabric.host_ns(1))
    assert world.dps[1].rebuild(base_records()).warnings == ()
    assert hello(i["a"], A("10.0.0.7")) == ("10.0.0.5", "b", "10.0.0.5")
    # Preserving b's address (instance stopped) removes its mapping on a's host.
    world.dps[1].apply([rec("acct1", "10.0.0.7", "10.250.1.7", 2, 5, "preserved")])
    assert unreachable(i["a"], A("10.0.0.7"))
    # A full desired set brings it back and removes what the set no longer has.
    full = [r for r in base_records() if r.account == "acct1"]
    result = world.dps[1].apply(full, full=True)
    assert hello(i["a"], A("10.0.0.7"))[1] == "b"
    assert set(world.dps[1].records) == {r.key for r in full}
    assert result.generation == 5
    assert unreachable(i["x"], A("10.0.0.7"))  # acct2's y lost its mapping on h1

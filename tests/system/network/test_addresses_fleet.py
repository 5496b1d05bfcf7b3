"""Preserved logical addresses end to end: a controller and three real agent processes in
host namespaces, instances as namespaces behind veths, traffic through the translation.

Covers the issue's "Done when": peers of one account reach each other by logical address
and see logical addresses; another account with an overlapping range cannot reach them;
preserve -> claim by a new instance (another account's claim refused); a move to another
host cuts the open flow and new connections reach the new host; ``record list`` shows
what each host applied; an agent restart rebuilds its table from the records.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from net_echo_helpers import EchoServer, connect, hello

from edgevisor import Client
from edgevisor.errors import Forbidden
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


class Fleet:
    def __init__(self, topo: Topology, ctl: RunningController, tmp: Path) -> None:
        self.topo, self.ctl, self.tmp = topo, ctl, tmp
        self.port = int(ctl.url.rsplit(":", 1)[1])
        self.admin = Client(ctl.url, ctl.admin_token)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEVISOR_")} | {
            "EDGEVISOR_AGENT__HEARTBEAT_INTERVAL_S": "0.3",
            "EDGEVISOR_AGENT__LISTEN_HOST": "0.0.0.0",
            "EDGEVISOR_AGENT__LISTEN_PORT": "7451",
            # Instance namespaces carry the topology prefix: its teardown removes them.
            "EDGEVISOR_NETWORK__INSTANCE_NETNS_PREFIX": f"{topo.prefix}-",
        }
        self.echos: list[EchoServer] = []
        self.names = [h.name for h in topo.hosts]

    def start_agent(self, i: int, join: bool = True) -> None:
        h = self.topo.hosts[i]
        jt = self.admin.create_join_token(host=h.name).secret if join else "-"
        argv = self.topo.agent_argv(h, controller_port=self.port, join_token=jt,
                                    data_dir=self.tmp / h.name)
        if not join:
            k = argv.index("--join-token")
            del argv[k:k + 2]
        # `ip netns exec` gives the agent a private mount namespace, where the instance
        # namespaces it mounts under /run/netns would stay invisible to this test. A real
        # host's agent shares the host's mounts: go back to ours, keep the host's netns.
        argv = ["nsenter", f"--mount=/proc/{os.getpid()}/ns/mnt", "--", *argv]
        log = open(self.tmp / f"{h.name}.log", "ab")  # noqa: SIM115 - closed with the process
        self.topo.start_agent(h, argv, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def op(self, host: str, op: str, payload: dict[str, Any]) -> Any:
        with self.ctl.state.store.session() as s:
            h = repos.get_host(s, host)
            url, key = h.agent_url, h.agent_key
        r = httpx.post(f"{url}/agent/v1/ops/{op}", json=payload, timeout=30,
                       headers={"authorization": f"Bearer {key}"})
        assert r.status_code < 400, r.text
        return r.json().get("result")

    def instance(
        self, name: str, host: str, account: str, logical: str, label: str | None = None
    ) -> str:
        out = self.op(host, "instances.create",
                      {"name": name, "account": account, "logical": logical})
        self.echos.append(EchoServer(label or name, out["netns"]).start())
        return str(out["netns"])

    def remove(self, name: str, host: str) -> None:
        for e in [e for e in self.echos if e.name == name]:
            e.stop()
            self.echos.remove(e)
        assert self.op(host, "instances.remove", {"name": name})["removed"]

    def converged(self, account: str) -> bool:
        rows = self.admin.list_records(account=account)
        return all(not r.drift for r in rows)

    def close(self) -> None:
        for e in self.echos:
            e.stop()
        self.admin.close()


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    with Topology(3) as topo:
        overrides = {"controller.heartbeat_timeout_s": 3.0,
                     "controller.reconcile_interval_s": 0.3,
                     "network.reconcile_interval_s": 0.5,
                     # Leak collection runs fast: it must never free an address in use.
                     "network.leak_grace_s": 2.0, "network.leak_interval_s": 0.5}
        with running_controller(tmp_path / "ctl", overrides,
                                host=topo.controller_address) as ctl:
            f = Fleet(topo, ctl, tmp_path)
            try:
                for i in range(3):
                    f.start_agent(i)
                wait_for(lambda: all(h.state == "up" for h in f.admin.list_hosts())
                         and len(f.admin.list_hosts()) == 3, "three hosts up")
                assert topo.subnet is not None
                pool = list(topo.subnet.subnets(new_prefix=25))[1]  # hosts are .10-.12
                f.admin.create_physical_pool(str(pool))
                yield f
            finally:
                f.close()


def test_addresses_end_to_end_in_three_host_fleet(fleet: Fleet) -> None:
    f, admin = fleet, fleet.admin
    h0, h1, h2 = f.names
    for acct in ("acme", "bravo"):
        admin.create_account(acct)
        admin.create_network("net", "10.0.0.0/24", account=acct)

    # Two instances of acme on different hosts; bravo reuses acme's 10.0.0.7 on a third.
    for host, acct, addr, name in [(h0, "acme", "10.0.0.5", "a"), (h1, "acme", "10.0.0.7", "b"),
                                   (h2, "bravo", "10.0.0.7", "x"),
                                   (h2, "bravo", "10.0.0.9", "y")]:
        admin.allocate_address("net", addr, account=acct)
        admin.bind_address(addr, name, host, account=acct)
    ns = {n: f.instance(n, host, acct, addr) for host, acct, addr, n in [
        (h0, "acme", "10.0.0.5", "a"), (h1, "acme", "10.0.0.7", "b"),
        (h2, "bravo", "10.0.0.7", "x"), (h2, "bravo", "10.0.0.9", "y")]}

    assert wait_for(lambda: hello(ns["a"], "10.0.0.7"), "a reaches b") == (
        "10.0.0.5", "b", "10.0.0.5")
    assert hello(ns["b"], "10.0.0.5") == ("10.0.0.7", "a", "10.0.0.7")
    # bravo's own 10.0.0.7 answers bravo; acme's instances are out of its reach.
    assert wait_for(lambda: hello(ns["y"], "10.0.0.7"), "y reaches x")[1] == "x"
    assert hello(ns["x"], "10.0.0.5") is None
    assert hello(ns["y"], "10.0.0.5") is None

    # An update the host cannot apply (two local records, one physical address) is
    # reported as failed per record, and the last good table stays in force.
    state_before = f.op(h0, "records.state", {})
    bad = [{"id": 900000 + k, "account": "acme", "logical": f"10.0.0.{50 + k}",
            "physical": "10.251.250.250", "host": h0, "state": "bound", "generation": 1}
           for k in range(2)]
    out = f.op(h0, "records.apply", {"full": False, "records": bad, "removed": []})
    assert out["error"] and all(r["error"] for r in out["reports"])
    assert f.op(h0, "records.state", {})["applied"] == state_before["applied"]
    assert hello(ns["a"], "10.0.0.7") == ("10.0.0.5", "b", "10.0.0.5")

    # record list: each record shows the generation each host applied; no drift.
    wait_for(lambda: f.converged("acme"), "acme records applied everywhere")
    rows = {r.record.logical: r for r in admin.list_records(account="acme")}
    b_rec = rows["10.0.0.7"]
    assert b_rec.needed_by == sorted([h0, h1])
    assert {a.host: a.generation for a in b_rec.applied} == {
        h0: b_rec.record.generation, h1: b_rec.record.generation}

    # Preserve b's address, remove b; a new instance on h2 claims it; a reaches it there.
    admin.preserve_address("10.0.0.7", account="acme")
    f.remove("b", h1)
    assert wait_for(lambda: hello(ns["a"], "10.0.0.7") is None, "b gone")
    bravo = Client(f.ctl.url, admin.create_token(account="bravo").secret)
    with pytest.raises(Forbidden):
        bravo.claim_address(b_rec.record.id, "steal", h2)
    bravo.close()
    admin.claim_address("10.0.0.7", "c", h2, account="acme")
    ns["c"] = f.instance("c", h2, "acme", "10.0.0.7")
    assert wait_for(lambda: hello(ns["a"], "10.0.0.7"), "a reaches c") == (
        "10.0.0.5", "c", "10.0.0.5")
    assert hello(ns["c"], "10.0.0.5") == ("10.0.0.7", "a", "10.0.0.7")
    assert hello(ns["x"], "10.0.0.5") is None  # bravo still cut off

    # Move c's record to h1 (the migration hook). A flow open to the old mapping is cut;
    # new connections reach the new host.
    old = connect(ns["a"], "10.0.0.7", timeout=5)
    rf = old.makefile("rb")
    assert rf.readline().split()[0] == b"c"
    # The migration target: the same instance, started on h1 (the old one still runs).
    ns["c1"] = f.instance("c", h1, "acme", "10.0.0.7", label="c@h1")
    moved = admin.move_address("10.0.0.7", h1, account="acme")
    assert moved.host == h1
    # At once, before the hosts' conntrack cleanup could run: the flow was fenced off in
    # the same transaction that changed the mapping (stale epoch), on every host.
    reply: bytes | None
    try:
        old.settimeout(3)
        old.sendall(b"ping\n")
        reply = rf.readline()
    except OSError:
        reply = None
    assert reply != b"c ping\n", "the open flow still reached the old host"
    old.close()
    assert wait_for(lambda: hello(ns["a"], "10.0.0.7"), "a reaches c on h1") == (
        "10.0.0.5", "c@h1", "10.0.0.5")
    wait_for(lambda: f.converged("acme"), "move applied everywhere")

    # Agent restart: stop h0's agent, wipe its table, and a loses its peers; the new
    # agent process rebuilds the table from the controller's records.
    gen_before = {a.host: a.generation for a in admin.list_records(account="acme")[0].applied}
    f.topo.stop_agent(f.topo.hosts[0])
    f.topo.hosts[0].exec(["nft", "delete", "table", "ip", "edgevisor"])
    assert hello(ns["a"], "10.0.0.7") is None
    f.start_agent(0, join=False)
    assert wait_for(lambda: hello(ns["a"], "10.0.0.7"), "table rebuilt after restart",
                    timeout_s=40)[1] == "c@h1"
    wait_for(lambda: f.converged("acme"), "restarted host reported")
    assert set(gen_before) <= {a.host for a in admin.list_records(account="acme")[0].applied}
    kinds = [e.kind for e in admin.recent_events() if e.kind.startswith("address.")]
    assert kinds.count("address.moved") == 1 and kinds.count("address.claimed") == 1
    # Drift repair: h0's stored report falls behind (as after a lost push); the
    # reconciler pushes h0 its set again and the report catches up.
    cred = json.loads((f.tmp / h0 / "agent" / h0 / "credential.json").read_text())["secret"]
    rec7 = next(r for r in admin.list_records(account="acme") if r.record.logical == "10.0.0.7")
    httpx.post(f"{f.ctl.url}/v1/hosts/{h0}/records/applied",
               headers={"authorization": f"Bearer {cred}"},
               json={"reports": [{"record_id": rec7.record.id, "generation": 1}]},
               ).raise_for_status()
    # (No other push happens now: only the reconciler can bring h0's report back.)
    wait_for(lambda: f.converged("acme"), "reconciler repaired h0's drift")

    time.sleep(3)  # past the leak grace: live instances keep their addresses
    for acct in ("acme", "bravo"):
        assert {r.state for r in admin.list_addresses(account=acct)} == {"bound"}
    assert "address.leak_collected" not in [e.kind for e in admin.recent_events()]

"""Domains with logical addresses in the 3-host topology, migrated (as root).

Three real agent processes in host namespaces with the address dataplane on; two domains
of one account on two hosts, each with a logical address. Each domain runs a small HTTP
app that answers with its name, its address and the address it sees the client at, and
that fetches from another address *from inside the domain* (``/fetch/ADDR:PORT``), so
domain-to-domain traffic is the domains' own, through the translation. One domain migrates
to the third host: it keeps its logical address, its record moves there (between the stop
on the source and the start on the target), and its peer reaches it at the same address.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edgevisor import Client
from edgevisor.migration.runner import runner_for
from edgevisor.network.netns import call_in, netns_exists
from edgevisor.storage.hostfs import read_mountinfo
from edgevisor.testing.controller import RunningController, running_controller
from edgevisor.testing.topology import Host, Topology

pytestmark = [pytest.mark.root, pytest.mark.timeout(400)]

PY = os.path.realpath(sys.executable)
APP_CMD = [PY, "-I", "-S", "/task/peer.py"]
PORT = 8080
NET = "10.77.0.0/24"  # logical: exists only inside the test's namespaces
A_ADDR, B_ADDR = "10.77.0.5", "10.77.0.7"
ENV = {
    "EDGEVISOR_AGENT__HEARTBEAT_INTERVAL_S": "0.3",
    "EDGEVISOR_AGENT__LISTEN_HOST": "0.0.0.0",
    "EDGEVISOR_AGENT__LISTEN_PORT": "7451",
    "EDGEVISOR_DEVICES__BROKER_PORT": "0",
    "EDGEVISOR_STORAGE__NBD__LISTEN_HOST": "0.0.0.0",
    "EDGEVISOR_NETWORK__DATAPLANE_MODE": "on",
}
PEER_APP = """\
import http.server
import os
import urllib.request


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        code = 200
        if self.path.startswith("/fetch/"):
            try:
                url = "http://" + self.path[len("/fetch/"):] + "/"
                with urllib.request.urlopen(url, timeout=3) as resp:
                    body = resp.read()
            except OSError as exc:
                body, code = repr(exc).encode(), 502
        else:
            me = os.environ["EDGEVISOR_DOMAIN"], os.environ.get("EDGEVISOR_ADDRESS", "-")
            body = " ".join([*me, self.client_address[0]]).encode()
        self.send_response(code)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


http.server.ThreadingHTTPServer(("0.0.0.0", 8080), Handler).serve_forever()
"""


def _wait(pred: Callable[[], Any], what: str, timeout_s: float = 60.0) -> Any:
    end = time.monotonic() + timeout_s
    while True:
        got = pred()
        if got:
            return got
        assert time.monotonic() < end, f"{what} not reached within {timeout_s}s"
        time.sleep(0.2)


class Fleet:
    def __init__(self, topo: Topology, ctl: RunningController, root: Path) -> None:
        self.topo, self.ctl, self.root = topo, ctl, root
        self.admin = Client(ctl.url, ctl.admin_token)
        self.port = int(ctl.url.rsplit(":", 1)[1])
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEVISOR_")}
        self.env |= ENV
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, h: Host) -> None:
        jt = self.admin.create_join_token(host=h.name).secret
        argv = self.topo.agent_argv(
            h, controller_port=self.port, join_token=jt, data_dir=self.root / h.name
        )
        # nsenter, not `ip netns exec`: domains need the cgroup v1 hierarchies that the
        # latter's /sys remount hides, and their namespaces must be visible to the test.
        with open(self.root / f"{h.name}.log", "ab") as log:
            self.procs[h.name] = subprocess.Popen(
                ["nsenter", f"--net=/run/netns/{h.netns}", "--", *argv],
                env=self.env, stdout=log, stderr=log, start_new_session=True,
            )  # fmt: skip
        _wait(lambda: self.state(h.name) == "up", f"{h.name} up", 120)

    def stop(self, h: Host) -> None:
        proc = self.procs.pop(h.name, None)
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)

    def state(self, name: str) -> str | None:
        return {x.name: x.state for x in self.admin.list_hosts()}.get(name)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    with Topology(3) as topo:
        fast = {"controller.heartbeat_timeout_s": 3.0, "controller.reconcile_interval_s": 0.3,
                "network.reconcile_interval_s": 0.5,
                # Leak collection runs fast: it must never free a domain's address.
                "network.leak_grace_s": 1.0, "network.leak_interval_s": 0.3}  # fmt: skip
        with running_controller(tmp_path / "ctl", fast, host=topo.controller_address) as ctl:
            f = Fleet(topo, ctl, tmp_path)
            try:
                for h in topo.hosts:
                    f.start(h)
                assert topo.subnet is not None
                f.admin.create_physical_pool(str(list(topo.subnet.subnets(new_prefix=25))[1]))
                f.admin.create_account("acme")
                f.admin.create_network("net", NET, account="acme")
                yield f
            finally:
                for h in topo.hosts:  # SIGTERM: agents stop their domains and mounts
                    f.stop(h)
                f.admin.close()
    left = [m.mount_point for m in read_mountinfo() if str(tmp_path) in m.mount_point]
    assert left == [], left


def _get(netns: str, url: str) -> str | None:
    """GET ``url`` from inside namespace ``netns``; the body, or None on any failure."""

    def get() -> str | None:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return resp.read().decode() if resp.status == 200 else None
        except (OSError, urllib.error.HTTPError):
            return None

    return call_in(netns, get)


def _fetch(acme: Client, src: str, dst_addr: str) -> str | None:
    """Domain ``src`` fetches ``/`` from ``dst_addr`` (its own process does the request)."""
    d = acme.get_domain(src)
    assert d.live is not None and d.live.get("netns"), d
    return _get(str(d.live["netns"]), f"http://127.0.0.1:{PORT}/fetch/{dst_addr}:{PORT}")


def test_domains_reach_each_other_by_logical_address_across_a_migration(
    fleet: Fleet, tmp_path: Path
) -> None:
    h0, h1, h2 = fleet.topo.hosts
    app = tmp_path / "app"
    app.mkdir()
    (app / "peer.py").write_text(PEER_APP)
    with Client(fleet.ctl.url, fleet.admin.create_token("acme").secret) as acme:
        a = acme.create_domain("a", APP_CMD, "32M", app=app, host=h0.name, network="net",
                               address=A_ADDR)  # fmt: skip
        b = acme.create_domain("b", APP_CMD, "32M", app=app, host=h1.name, network="net",
                               address=B_ADDR)  # fmt: skip
        assert (a.address, b.address) == (A_ADDR, B_ADDR)

        # Each reaches the other by logical address and sees the other's logical address.
        assert _wait(lambda: _fetch(acme, "a", B_ADDR), "a reaches b") == f"b {B_ADDR} {A_ADDR}"
        assert _wait(lambda: _fetch(acme, "b", A_ADDR), "b reaches a") == f"a {A_ADDR} {B_ADDR}"
        rec = fleet.admin.get_address(B_ADDR, account="acme")
        assert (rec.state, rec.host, rec.instance) == ("bound", h1.name, "domain:acme.b")
        old_netns = str(acme.get_domain("b").live["netns"])  # type: ignore[index]

        m = acme.migrate_domain("b", h2.name)
        end = time.monotonic() + 240
        while not ((info := acme.get_migration(m.id)).final and info.settled):
            assert time.monotonic() < end, info
            time.sleep(0.2)
        assert info.phase == "committed", info

        # b kept its address; its record moved to the new host (a new physical address).
        b = acme.get_domain("b")
        assert (b.host, b.address, b.network) == (h2.name, B_ADDR, "net")
        moved = fleet.admin.get_address(B_ADDR, account="acme")
        assert (moved.state, moved.host, moved.instance) == ("bound", h2.name, "domain:acme.b")
        assert moved.generation > rec.generation and moved.physical != rec.physical
        history = [h.event for h in fleet.admin.address_history(B_ADDR, account="acme")]
        assert history[-1] == "move"
        # The record moved after the stop on the source, issued with the start on the
        # target (the switch's second step).
        runner = runner_for(fleet.ctl.state)
        took = dict(runner.timings[m.id])
        print(f"switch downtime {info.downtime_s:.3f} s; MoveRecord {took['MoveRecord']:.3f} s, "
              f"SetRoles {took[f'SetRoles({h2.name})']:.3f} s")  # fmt: skip
        trace = runner.trace[m.id]
        assert trace.index("QuiesceSource") < trace.index("MoveRecord")
        assert trace.index("MoveRecord") < trace.index("StartOnTarget")
        spans = {label: (t0, t1) for label, t0, t1 in runner.spans[m.id]}
        assert spans["MoveRecord"][0] >= spans["QuiesceSource"][1]
        assert not netns_exists(old_netns)  # released on the source

        # The peer reaches b at the same logical address on its new host, and back.
        assert _wait(lambda: _fetch(acme, "a", B_ADDR), "a reaches b on h2") == (
            f"b {B_ADDR} {A_ADDR}"
        )
        assert _wait(lambda: _fetch(acme, "b", A_ADDR), "b on h2 reaches a") == (
            f"a {A_ADDR} {B_ADDR}"
        )
        _wait(lambda: all(not r.drift for r in fleet.admin.list_records(account="acme")),
              "records applied everywhere")  # fmt: skip

        # A stopped domain keeps its address: its host still reports its instance, so the
        # leak collector (grace 1 s here) leaves the record alone; started again, it is
        # reached at the same address.
        acme.stop_domain("a")
        time.sleep(3.0)
        kept = fleet.admin.get_address(A_ADDR, account="acme")
        assert (kept.state, kept.host, kept.instance) == ("bound", h0.name, "domain:acme.a")
        acme.start_domain("a")
        assert _wait(lambda: _fetch(acme, "b", A_ADDR), "b reaches a again") == (
            f"a {A_ADDR} {B_ADDR}"
        )

        # Removing them preserves both addresses for the account.
        acme.remove_domain("a")
        acme.remove_domain("b")
        states = {r.logical: r.state for r in fleet.admin.list_addresses(account="acme")}
        assert states == {A_ADDR: "preserved", B_ADDR: "preserved"}

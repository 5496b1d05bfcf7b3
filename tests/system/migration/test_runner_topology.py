"""Migration in the 3-host topology with real agent processes (as root).

Hosts are network namespaces on a bridge; each runs ``edgevisor agent`` as its own
process; volumes travel over NBD/TLS across the fabric. The client writing to the kv
domain runs in a thread that enters the network namespace of whichever host the
controller says runs the domain (a domain's address is reachable inside its host).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edgevisor import Client
from edgevisor.migration.testbed import http
from edgevisor.sdk.migrations import MigrationInfo
from edgevisor.storage.attach import recover_stale
from edgevisor.storage.hostfs import read_mountinfo
from edgevisor.testing.controller import RunningController, running_controller
from edgevisor.testing.topology import Host, Topology

pytestmark = [pytest.mark.root, pytest.mark.timeout(400)]

KV_APP = Path(__file__).resolve().parents[3] / "examples" / "domains" / "kv"
PY = os.path.realpath(sys.executable)
KV_CMD = [PY, "-I", "-S", "/task/kv.py", "--port", "8080"]
CLONE_NEWNET = 0x40000000
ENV = {
    "EDGEVISOR_AGENT__HEARTBEAT_INTERVAL_S": "0.3",
    "EDGEVISOR_AGENT__LISTEN_HOST": "0.0.0.0",
    "EDGEVISOR_AGENT__LISTEN_PORT": "7451",
    "EDGEVISOR_DEVICES__BROKER_PORT": "0",
    "EDGEVISOR_STORAGE__NBD__LISTEN_HOST": "0.0.0.0",
    "EDGEVISOR_NETWORK__DATAPLANE_MODE": "off",
}
# A read or mirrored write the source cannot serve fails (EIO) after this instead of 30 s:
# a restarted target clears its dead domain's mount sooner. (Not while a source is away
# and the domain writes: a failed write makes ext4 go read-only.)
SHORT_FETCH = {"EDGEVISOR_STORAGE__LAZY__FETCH_TIMEOUT_S": "3"}
_libc = ctypes.CDLL(None, use_errno=True)


def _enter_netns(name: str) -> None:
    """Move the calling thread (only) into network namespace ``name``."""
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {name}")
    finally:
        os.close(fd)


def _wait(pred: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    end = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < end, f"{what} not reached within {timeout_s}s"
        time.sleep(0.1)


class Fleet:
    def __init__(self, topo: Topology, ctl: RunningController, root: Path) -> None:
        self.topo, self.ctl, self.root = topo, ctl, root
        self.admin = Client(ctl.url, ctl.admin_token)
        self.port = int(ctl.url.rsplit(":", 1)[1])
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEVISOR_")}
        self.env |= ENV
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, h: Host, first: bool = True, env: dict[str, str] | None = None) -> None:
        jt = self.admin.create_join_token(host=h.name).secret if first else "-"
        argv = self.topo.agent_argv(
            h, controller_port=self.port, join_token=jt, data_dir=self.root / h.name
        )
        if not first:
            argv = [a for a in argv if a not in ("--join-token", "-")]
        # Not topo.start_agent: ``ip netns exec`` remounts /sys, which hides the cgroup v1
        # hierarchies domains need; nsenter enters only the network namespace.
        with open(self.root / f"{h.name}.log", "ab") as log:
            self.procs[h.name] = subprocess.Popen(
                ["nsenter", f"--net=/run/netns/{h.netns}", "--", *argv],
                env=self.env | (env or {}), stdout=log, stderr=log, start_new_session=True,
            )  # fmt: skip
        _wait(lambda: self.state(h.name) == "up", f"{h.name} up", 120)

    def stop(self, h: Host, sig: int = signal.SIGTERM, grace_s: float = 30) -> None:
        proc = self.procs.pop(h.name, None)
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                self.procs[h.name] = proc  # blocked in the kernel: the caller clears mounts
                raise

    def state(self, name: str) -> str | None:
        return {x.name: x.state for x in self.admin.list_hosts()}.get(name)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    with Topology(3) as topo:
        fast = {"controller.heartbeat_timeout_s": 2.0, "controller.reconcile_interval_s": 0.2}
        with running_controller(tmp_path / "ctl", fast, host=topo.controller_address) as ctl:
            f = Fleet(topo, ctl, tmp_path)
            try:
                for h in topo.hosts:
                    f.start(h)
                f.admin.create_account("acme")
                yield f
            finally:
                stuck = _stop_all(f, tmp_path)
                f.admin.close()
    left = [m.mount_point for m in read_mountinfo() if str(tmp_path) in m.mount_point]
    assert left == [], left
    assert stuck == [], f"agents that did not stop on SIGTERM/SIGKILL: {stuck}"


def _stop_all(f: Fleet, root: Path) -> list[str]:
    """Stop every agent; if one hangs (e.g. blocked on a FUSE mount whose server is gone),
    clear the stale FUSE mounts and loop devices under ``root`` so it can die, and so a
    failed test leaves nothing mounted behind."""
    stuck: list[str] = []
    for h in f.topo.hosts:  # SIGTERM: agents stop their domains and mounts
        try:
            f.stop(h)
        except subprocess.TimeoutExpired:
            stuck.append(h.name)
    for attach_dir in sorted(root.glob("*/agent/*/attach")):
        asyncio.run(recover_stale(attach_dir))
    for proc in f.procs.values():
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(30)
    return stuck


class NsWriter:
    """Writes keys to the kv domain from inside its current host's namespace."""

    def __init__(self, acme: Client, fleet: Fleet, name: str) -> None:
        self.acme, self.fleet, self.name = acme, fleet, name
        self.acked: dict[str, str] = {}
        self.last_error = ""
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._ns = {h.name: h.netns for h in fleet.topo.hosts}

    def _where(self) -> str:
        d = self.acme.get_domain(self.name)
        _enter_netns(self._ns[d.host])
        assert d.address
        return d.address

    def _run(self) -> None:
        addr, i = self._where(), 0
        while not self._stop.is_set():
            key, val = f"k{i}", f"v{i}"
            code = 0
            try:
                code, _ = http("PUT", f"http://{addr}:8080/kv/{key}", val.encode(), timeout_s=2)
            except OSError as exc:
                self.last_error = f"{addr}: {exc!r}"
            if code == 204:
                self.acked[key] = val
                i += 1
                continue
            time.sleep(0.05)
            try:
                addr = self._where()
            except Exception as exc:
                self.last_error = f"where: {exc!r}"

    def read_all(self) -> dict[str, str]:
        out: dict[str, dict[str, str]] = {}

        def read() -> None:
            addr = self._where()
            end = time.monotonic() + 60
            while True:
                with contextlib.suppress(OSError):
                    code, body = http("GET", f"http://{addr}:8080/kv", timeout_s=10)
                    if code == 200:
                        out["kv"] = json.loads(body)
                        return
                assert time.monotonic() < end
                time.sleep(0.2)

        t = threading.Thread(target=read)  # setns is per thread: a fresh one
        t.start()
        t.join(90)
        return out["kv"]

    def __enter__(self) -> NsWriter:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join(30)


def _final(acme: Client, mid: str, deadline_s: float = 240) -> MigrationInfo:
    end = time.monotonic() + deadline_s
    seen = 0
    while True:
        m = acme.get_migration(mid)
        assert m.present_bytes >= seen
        seen = m.present_bytes
        if m.final and m.settled:
            return m
        assert time.monotonic() < end, m
        time.sleep(0.2)


def test_migrate_under_writes_across_the_fabric(fleet: Fleet) -> None:
    a, b, _c = fleet.topo.hosts
    with Client(fleet.ctl.url, fleet.admin.create_token("acme").secret) as acme:
        acme.create_domain("kv", KV_CMD, "64M", app=KV_APP, host=a.name)
        with NsWriter(acme, fleet, "kv") as w:
            _wait(lambda: len(w.acked) > 20, "writes on the source")
            m = acme.migrate_domain("kv", b.name)
            final = _final(acme, m.id)
            on_target = len(w.acked)
            try:
                _wait(lambda: len(w.acked) > on_target + 20, "writes on the target")
            except AssertionError:
                d = acme.get_domain("kv")
                raise AssertionError(
                    f"{final} {d.host} {d.phase} {d.address} {d.live} {w.last_error}"
                ) from None
        assert final.phase == "committed", final
        assert acme.get_domain("kv").host == b.name
        stored = w.read_all()
        lost = [k for k, v in w.acked.items() if stored.get(k) != v]
        assert not lost, f"{len(lost)} acknowledged writes lost"
        acme.remove_domain("kv")


def test_target_killed_in_post_sync_fails_back(fleet: Fleet) -> None:
    a, b, _c = fleet.topo.hosts
    with Client(fleet.ctl.url, fleet.admin.create_token("acme").secret) as acme:
        acme.create_domain("kv", KV_CMD, "64M", app=KV_APP, host=a.name)
        with NsWriter(acme, fleet, "kv") as w:
            _wait(lambda: len(w.acked) > 20, "writes on the source")
            m = acme.migrate_domain("kv", b.name, rate_bytes_s=1 << 20)
            _wait(lambda: acme.get_migration(m.id).phase == "post_sync", "post_sync")
            n = len(w.acked)
            _wait(lambda: len(w.acked) > n + 20, "writes on the target")
            fleet.stop(b, signal.SIGKILL)  # the target host dies
            _wait(lambda: acme.get_migration(m.id).phase == "failed_back", "failed back", 120)
            n = len(w.acked)
            _wait(lambda: len(w.acked) > n + 20, "writes on the source again")
        assert acme.get_domain("kv").host == a.name
        stored = w.read_all()
        lost = [k for k, v in w.acked.items() if stored.get(k) != v]
        assert not lost, f"{len(lost)} acknowledged writes lost"
        # the target returns: what it still holds of the domain is discarded
        fleet.start(b, first=False, env=SHORT_FETCH)
        final = _final(acme, m.id)
        assert final.phase == "failed_back"
        acme.remove_domain("kv")


def test_source_killed_in_post_sync_completes_when_it_returns(fleet: Fleet) -> None:
    a, b, _c = fleet.topo.hosts
    with Client(fleet.ctl.url, fleet.admin.create_token("acme").secret) as acme:
        acme.create_domain("kv", KV_CMD, "64M", app=KV_APP, host=a.name)
        with NsWriter(acme, fleet, "kv") as w:
            _wait(lambda: len(w.acked) > 20, "writes on the source")
            m = acme.migrate_domain("kv", b.name, rate_bytes_s=2 << 20)
            _wait(lambda: acme.get_migration(m.id).phase == "post_sync", "post_sync")
            n = len(w.acked)
            _wait(lambda: len(w.acked) > n + 20, "writes on the target")
            fleet.stop(a, signal.SIGKILL)  # the source host dies
            _wait(lambda: acme.get_migration(m.id).blocked_on == a.name, "waits for source")
            assert acme.get_migration(m.id).phase == "post_sync"
            assert acme.get_domain("kv").host == b.name
            fleet.start(a, first=False)
            final = _final(acme, m.id)
            n = len(w.acked)
            _wait(lambda: len(w.acked) > n + 20, "writes after the commit")
        assert final.phase == "committed", final
        stored = w.read_all()
        lost = [k for k, v in w.acked.items() if stored.get(k) != v]
        assert not lost, f"{len(lost)} acknowledged writes lost"
        acme.remove_domain("kv")

"""A controller killed (SIGKILL) in the middle of a stream of address transitions loses no
history (issue 7, "Bad input and faults"), and the hosts converge on the records after it
comes back.

A real ``edgevisor controller`` process (SQLite store) and two real agents in a 2-host
topology. Two client threads drive transitions as fast as the API answers: one moves a
record between the hosts, the other preserves and re-claims another. The controller is
killed with SIGKILL while calls are in flight, then started again on the same data dir.

The history must list exactly the acknowledged transitions: every acknowledged
generation is there with the right event, generations are contiguous from 1, and the
only entries beyond the acknowledged ones are the calls that were in flight at the kill
(at most one per thread, each the next generation). Then both agents must report the
records' current generations (the reconciler pushes again what a lost push or a lost
report left behind).
"""

from __future__ import annotations

import functools
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from edgevisor import Client
from edgevisor.errors import EdgevisorError
from edgevisor.testing.controller import free_port
from edgevisor.testing.topology import Topology

pytestmark = pytest.mark.root
EV = str(Path(sys.executable).with_name("edgevisor"))


def wait_for(pred: Callable[[], Any], what: str, timeout_s: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            got = pred()
        except (httpx.HTTPError, EdgevisorError):
            got = None
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached within {timeout_s}s")
        time.sleep(0.2)


@dataclass
class Stream:
    """One client thread's calls: acknowledged ``(event, generation)`` and in-flight ones."""

    acked: list[tuple[str, int]] = field(default_factory=list)
    failed: int = 0  # calls that got no answer (the controller died under them)
    errors: list[str] = field(default_factory=list)


class Controller:
    def __init__(self, tmp: Path, listen: str) -> None:
        self.dir = tmp / "ctl"
        self.listen = listen
        self.port = free_port(listen)
        self.url = f"http://{listen}:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEVISOR_")} | {
            "EDGEVISOR_NETWORK__RECONCILE_INTERVAL_S": "0.5",
            "EDGEVISOR_CONTROLLER__HEARTBEAT_TIMEOUT_S": "30",
            "EDGEVISOR_LOG_LEVEL": "warning",
        }
        self._log = tmp / "ctl.log"

    def start(self) -> None:
        with open(self._log, "ab") as log:
            self.proc = subprocess.Popen(
                [EV, "controller", "--data-dir", str(self.dir), "--port", str(self.port),
                 "--listen", self.listen],
                stdout=log, stderr=subprocess.STDOUT, env=self.env,
            )  # fmt: skip
        wait_for(lambda: (self.dir / "admin.token").exists(), "admin token written")
        token = (self.dir / "admin.token").read_text().strip()
        wait_for(lambda: httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200,
                 "controller answers")
        self.token = token

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[tuple[Topology, Controller, Client]]:
    with Topology(2) as topo:
        ctl = Controller(tmp_path, topo.controller_address)
        try:
            ctl.start()
            admin = Client(ctl.url, ctl.token)
            env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEVISOR_")} | {
                "EDGEVISOR_AGENT__HEARTBEAT_INTERVAL_S": "0.3",
                "EDGEVISOR_AGENT__LISTEN_HOST": "0.0.0.0",
                "EDGEVISOR_AGENT__LISTEN_PORT": "7451",
                "EDGEVISOR_NETWORK__INSTANCE_NETNS_PREFIX": f"{topo.prefix}-",
            }
            for h in topo.hosts:
                argv = topo.agent_argv(h, controller_port=ctl.port,
                                       join_token=admin.create_join_token(host=h.name).secret,
                                       data_dir=tmp_path / h.name)
                argv = ["nsenter", f"--mount=/proc/{os.getpid()}/ns/mnt", "--", *argv]
                with open(tmp_path / f"{h.name}.log", "ab") as log:
                    topo.start_agent(h, argv, env=env, stdout=log, stderr=subprocess.STDOUT)
            wait_for(lambda: len([h for h in admin.list_hosts() if h.state == "up"]) == 2,
                     "two hosts up")
            assert topo.subnet is not None
            admin.create_physical_pool(str(list(topo.subnet.subnets(new_prefix=25))[1]))
            yield topo, ctl, admin
            admin.close()
        finally:
            ctl.stop()


def mover(url: str, token: str, hosts: list[str], stop: threading.Event, out: Stream) -> None:
    with Client(url, token, timeout_s=10) as c:
        k = 0
        while not stop.is_set():
            try:
                rec = c.move_address("10.0.0.7", hosts[k % 2], account="acme")
            except (httpx.HTTPError, EdgevisorError) as exc:
                if isinstance(exc, EdgevisorError) and exc.status < 500:
                    out.errors.append(f"move: {exc}")
                out.failed += 1
                return  # the controller died under this call
            out.acked.append(("move", rec.generation))
            k += 1


def preserver(url: str, token: str, host: str, stop: threading.Event, out: Stream) -> None:
    with Client(url, token, timeout_s=10) as c:
        k = 0
        while not stop.is_set():
            try:
                if k % 2 == 0:
                    rec = c.preserve_address("10.0.0.9", account="acme")
                    ev = "preserve"
                else:
                    rec = c.claim_address("10.0.0.9", f"claimer-{k}", host, account="acme")
                    ev = "claim"
            except (httpx.HTTPError, EdgevisorError) as exc:
                if isinstance(exc, EdgevisorError) and exc.status < 500:
                    out.errors.append(f"preserve/claim: {exc}")
                out.failed += 1
                return
            out.acked.append((ev, rec.generation))
            k += 1


def check_history(admin: Client, address: str, stream: Stream, first: list[str]) -> int:
    """The history equals the acknowledged calls plus at most the in-flight one."""
    hist = admin.address_history(address, account="acme")
    gens = [h.generation for h in hist]
    assert gens == list(range(1, len(gens) + 1)), f"generations not contiguous: {gens}"
    events = [h.event for h in hist]
    assert events[: len(first)] == first
    by_gen = {h.generation: h.event for h in hist}
    for ev, gen in stream.acked:
        assert by_gen.get(gen) == ev, f"acknowledged {ev} at generation {gen} is lost"
    last_acked = max((g for _, g in stream.acked), default=len(first))
    extra = [h for h in hist if h.generation > last_acked]
    # Only the call that was in flight at the kill may have committed unacknowledged.
    assert len(extra) <= stream.failed <= 1, (extra, stream.failed, stream.acked)
    return len(gens)


def test_controller_kill_9_mid_stream_loses_no_history(
    fleet: tuple[Topology, Controller, Client],
) -> None:
    topo, ctl, admin = fleet
    h0, h1 = (h.name for h in topo.hosts)
    admin.create_account("acme")
    admin.create_network("net", "10.0.0.0/24", account="acme")
    for addr, host, name in [("10.0.0.5", h0, "a"), ("10.0.0.7", h1, "b"),
                             ("10.0.0.9", h1, "c")]:
        admin.allocate_address("net", addr, account="acme")
        admin.bind_address(addr, name, host, account="acme")

    streams = (Stream(), Stream())
    stop = threading.Event()
    threads = [
        threading.Thread(target=mover, args=(ctl.url, ctl.token, [h0, h1], stop, streams[0])),
        threading.Thread(target=preserver, args=(ctl.url, ctl.token, h0, stop, streams[1])),
    ]
    for t in threads:
        t.start()
    try:
        # Let both streams get going, then kill the controller under them.
        wait_for(lambda: all(len(s.acked) >= 15 for s in streams), "streams running", 120)
        ctl.kill()
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    for s in streams:
        assert not s.errors, s.errors
        # The kill came while each thread had a call in flight (they loop without pause
        # and stop only after the kill): that call is the one the history may or may
        # not show.
        assert s.failed == 1, s
    # A call that raced the kill and got its answer anyway is fine: the thread stopped.
    ctl.start()

    n_move = check_history(admin, "10.0.0.7", streams[0], ["allocate", "bind"])
    n_pres = check_history(admin, "10.0.0.9", streams[1], ["allocate", "bind"])
    assert n_move >= 17 and n_pres >= 17

    # The hosts converge: each applied the current generation of every record it needs,
    # whatever push or report the kill swallowed (the reconciler pushes again).
    def converged() -> bool:
        rows = admin.list_records(account="acme")
        return bool(rows) and all(
            not r.drift and {a.host for a in r.applied} >= set(r.needed_by)
            and all(a.generation == r.record.generation for a in r.applied
                    if a.host in r.needed_by)
            for r in rows
        )

    wait_for(converged, "hosts applied the current records after the restart", 60)
    # And the agents themselves translate exactly that: what each host needs, at its
    # current generation, and nothing of acme it does not need.
    rows = admin.list_records(account="acme")
    for h in (h0, h1):
        got = wait_for(functools.partial(_agent_state, ctl, h), f"agent state of {h}")
        applied = {int(k): v for k, v in got[0].items()}
        for r in rows:
            if h in r.needed_by:
                assert applied.get(r.record.id) == r.record.generation, (h, r, applied)
            else:
                assert r.record.id not in applied, (h, r, applied)


def _agent_state(ctl: Controller, host: str) -> tuple[dict[str, int]] | None:
    """What the agent itself says it translates (``records.state``), called with the
    endpoint the controller stored (read from its SQLite file)."""
    with sqlite3.connect(f"file:{ctl.dir / 'controller.db'}?mode=ro", uri=True) as db:
        row = db.execute("SELECT agent_url, agent_key FROM hosts WHERE name = ?",
                         (host,)).fetchone()
    if row is None or not row[0]:
        return None
    r = httpx.post(f"{row[0]}/agent/v1/ops/records.state", json={}, timeout=10,
                   headers={"authorization": f"Bearer {row[1]}"})
    r.raise_for_status()
    applied: dict[str, int] = r.json()["result"]["applied"]
    return (applied,)  # a tuple: an empty table is an answer too

"""A controller and several in-process agents on one machine: tests, demo and benchmark.

Each agent is the full agent of ``edgevisor agent`` (:func:`edgevisor.agent.local.
build_agent`) with its own data dir, on its own event loop in its own thread, reached by
the controller in-process (``links.attach_local``) like ``edgevisor up`` does; its NBD
endpoint listens on loopback. Domains need root (namespaces, cgroups, FUSE).

``stop_agent``/``start_agent`` simulate a host crash and return (the agent's domains die
with it; its data dir stays).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import secrets
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from edgevisor.agent.daemon import Agent
from edgevisor.agent.local import build_agent
from edgevisor.sdk.client import Client
from edgevisor.settings import load_settings
from edgevisor.testing.controller import RunningController, running_controller

__all__ = ["LocalAgent", "Testbed", "http", "open_testbed", "wait_serving"]

T = TypeVar("T")


@dataclass
class LocalAgent:
    host: str
    agent: Agent
    loop: asyncio.AbstractEventLoop
    task: asyncio.Task[None]
    thread: threading.Thread

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float = 120) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)


@dataclass
class Testbed:
    __test__ = False  # not a pytest test class

    ctl: RunningController
    admin: Client
    root: Path
    agents: dict[str, LocalAgent] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    subnets: dict[str, str] = field(default_factory=dict)

    def start_agent(self, host: str) -> LocalAgent:
        token = None
        if not (self.root / host / "agent" / host / "credential.json").exists():
            token = self.admin.create_join_token(host=host).secret
        settings = load_settings(
            overrides={
                "data_dir": str(self.root / host),
                "agent.controller_url": self.ctl.url,
                "agent.host_name": host,
                "agent.heartbeat_interval_s": 0.2,
                **({"agent.join_token": token} if token else {}),
                "storage.nbd.listen_host": "127.0.0.1",
                "storage.nbd.listen_port": self._nbd_port(host),
                # Simulated hosts share this machine's root namespace: give each its own
                # domain addresses (the veth names derive from the address).
                "domains.test_subnet": self._subnet(host),
                "devices.broker_port": 0,  # no fixed MQTT port: runs side by side stay apart
                "network.dataplane_mode": "off",  # the root namespace is not ours to route
                **self.overrides,
            },
            environ={},
        )
        agent = build_agent(settings)
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        async def main() -> None:
            self.ctl.state.links.attach_local(host, agent.router)
            ready.set()
            with contextlib.suppress(asyncio.CancelledError):
                await agent.run(serve_api=False)

        task = loop.create_task(main())
        thread = threading.Thread(target=loop.run_until_complete, args=(task,), daemon=True)
        thread.start()
        ready.wait(30)
        la = LocalAgent(host, agent, loop, task, thread)
        self.agents[host] = la
        self.wait_up(host)
        return la

    def _nbd_port(self, host: str) -> int:
        """A port per host kept across restarts (a lazy volume reconnects to it)."""
        if host not in self.ports:
            from edgevisor.testing.controller import free_port

            self.ports[host] = free_port()
        return self.ports[host]

    def _subnet(self, host: str) -> str:
        """A /24 of test addresses per host, kept across its restarts (its domains keep
        their addresses) and unused by any route of the root namespace: testbeds running
        side by side (tests, the bench, the demo) must not route to each other's
        domains, which a fixed subnet per host index did."""
        if host not in self.subnets:
            taken = {ipaddress.IPv4Network(n) for n in self.subnets.values()}
            self.subnets[host] = str(free_test_subnet(taken))
        return self.subnets[host]

    def wait_up(self, host: str, deadline_s: float = 60) -> None:
        end = time.monotonic() + deadline_s
        vols = self.agents[host].agent.capability("volumes")
        while True:
            up = any(h.name == host and h.state == "up" for h in self.admin.list_hosts())
            if up and vols.server is not None and vols.server.ssl_context is not None:
                return
            if time.monotonic() > end:
                raise TimeoutError(f"host {host} did not come up")
            time.sleep(0.05)

    def stop_agent(self, host: str) -> None:
        """The host goes away: its agent stops (domains die with it), the link is cut."""
        la = self.agents.pop(host)
        self.ctl.state.links.detach_local(host)
        la.loop.call_soon_threadsafe(la.task.cancel)
        la.thread.join(120)

    def close(self) -> None:
        for host in list(self.agents):
            self.stop_agent(host)
        self.admin.close()


@contextlib.contextmanager
def open_testbed(
    root: Path, hosts: list[str], overrides: dict[str, Any] | None = None,
    controller_overrides: dict[str, Any] | None = None,
) -> Iterator[Testbed]:  # fmt: skip
    with running_controller(root / "ctl", controller_overrides) as ctl:
        tb = Testbed(ctl, Client(ctl.url, ctl.admin_token), root, overrides=overrides or {})
        try:
            for h in hosts:
                tb.start_agent(h)
            yield tb
        finally:
            tb.close()


def http(
    method: str, url: str, body: bytes | None = None, timeout_s: float = 5
) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return int(resp.status), bytes(resp.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), bytes(exc.read())


#: Where testbeds take their hosts' subnets (169.254.0.0/24 holds the domains' gateway;
#: ``bench/migration`` uses 169.254.224.0 and up).
_TEST_SPACE = ipaddress.IPv4Network("169.254.64.0/18")


def free_test_subnet(taken: set[ipaddress.IPv4Network]) -> ipaddress.IPv4Network:
    """A random /24 of :data:`_TEST_SPACE` that no root-namespace route (of any table, of
    any type) overlaps and that is not in ``taken``."""
    out = subprocess.run(
        ["ip", "-4", "route", "show", "table", "all"], capture_output=True, text=True, check=False
    ).stdout
    used = set(taken)
    for line in out.splitlines():
        toks = line.split()
        if toks and toks[0] in ("unreachable", "blackhole", "prohibit", "local", "broadcast"):
            toks = toks[1:]
        if not toks or toks[0] == "default":
            continue
        with contextlib.suppress(ValueError):
            used.add(ipaddress.IPv4Network(toks[0], strict=False))
    free = [n for n in _TEST_SPACE.subnets(new_prefix=24) if not any(n.overlaps(u) for u in used)]
    if not free:
        raise RuntimeError(f"no /24 of {_TEST_SPACE} is free of root-namespace routes")
    # Random, not first-free: two testbeds starting at once rarely pick the same one.
    return free[secrets.randbelow(len(free))]


def wait_serving(address: str, port: int = 8080, deadline_s: float = 60) -> None:
    end = time.monotonic() + deadline_s
    while True:
        try:
            if http("GET", f"http://{address}:{port}/healthz", timeout_s=2)[0] == 200:
                return
        except OSError:
            pass
        if time.monotonic() > end:
            raise TimeoutError(f"nothing serves on {address}:{port}")
        time.sleep(0.05)

"""Simulated multi-host network for system tests, benchmarks and the demo.

Shape of what ``Topology(n)`` builds (``P`` is the per-run prefix, ``N`` a free /24)::

    root namespace                 fabric namespace "P-fab"          host namespaces "P-hI"
    ┌──────────────────┐           ┌──────────────────────┐          ┌───────────────────┐
    │ Pc 10.251.N.1/24 ├─── veth ──┤ ctl ─┐               │          │ eth0 10.251.N.10+I│
    │ (controller)     │           │      br0 ── hI ──────┼── veth ──┤ lo                │
    └──────────────────┘           └──────────────────────┘          └───────────────────┘

Safety: the only thing added to the root namespace is the veth ``Pc`` with one address
and the kernel's connected /24 route on it; nothing routes from the root namespace
anywhere else, and host namespaces get no default route, so no packet they send can
leave the fabric (the root namespace does not forward either way unless someone turned
on ``ip_forward``; with no default route in hosts there is nothing to forward).

Concurrency: several runs may share one machine (CI, engineers). Names carry the owner's
pid and a random suffix, and the /24 is picked under a file lock from those not yet on a
root-namespace interface, so two topologies never share an address or a name.

Teardown: ``__exit__`` (also on an exception or Ctrl-C, and on SIGTERM, which we turn
into KeyboardInterrupt while the context is open) kills the process groups we started,
then any process still inside one of our namespaces, then deletes the root veth and the
namespaces (the other veths die with them). Setup and teardown run with SIGINT/SIGTERM
blocked so a second Ctrl-C cannot interrupt them halfway; the signal is delivered right
after. A run killed with SIGKILL leaves its names behind: ``cleanup_stale`` removes them.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import ipaddress
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from edgevisor.testing.netns import (
    TopologyError,
    blocked_signals,
    ip,
    kill_group,
    link_delete,
    netns_add,
    netns_delete,
    netns_exec_argv,
    netns_list,
)
from edgevisor.testing.topology_cleanup import (
    DEFAULT_PREFIX,
    cleanup_stale,
    group_exists,
    kill_netns_processes,
    leftovers,
)

__all__ = [
    "DEFAULT_PREFIX",
    "AsyncTopology",
    "Host",
    "Topology",
    "TopologyError",
    "cleanup_stale",
    "leftovers",
]

SUPERNET = ipaddress.IPv4Network("10.251.0.0/16")
_LOCK_PATH = Path("/run/lock/edgevisor-topology.lock")
_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,14}$")
_FIRST_HOST_OCTET = 10


# ICMP echo from a raw socket: argv = address, timeout; exit 0 on a matching reply.
_PING_SCRIPT = r"""
import os, socket, struct, sys, time
dst, deadline = sys.argv[1], time.monotonic() + float(sys.argv[2])
def csum(b):
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xFFFF); s += s >> 16
    return ~s & 0xFFFF
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
ident, seq = os.getpid() & 0xFFFF, 0
while time.monotonic() < deadline:
    seq += 1
    hdr = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + b"edgevisor-ping!!"
    s.sendto(hdr[:2] + struct.pack("!H", csum(hdr)) + hdr[4:], (dst, 0))
    s.settimeout(0.2)
    try:
        while True:
            data, (src, _) = s.recvfrom(2048)
            ihl = (data[0] & 0x0F) * 4
            typ, _, _, rid, rseq = struct.unpack("!BBHHH", data[ihl:ihl + 8])
            if src == dst and typ == 0 and rid == ident:
                sys.exit(0)
    except TimeoutError:
        pass
sys.exit(1)
"""


def _default_prefix() -> str:
    return f"{DEFAULT_PREFIX}{os.getpid():x}-{secrets.token_hex(2)[:3]}"


@dataclass
class Host:
    """One simulated host: a network namespace with one address on the fabric."""

    name: str
    index: int
    netns: str
    address: str
    topology: Topology = field(repr=False)

    def run(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        **popen_kwargs: Any,
    ) -> subprocess.Popen[Any]:
        """Start ``argv`` inside this host's namespace, in a new process group we track.

        The process is killed (group SIGTERM, then SIGKILL) when the topology closes,
        unless it has ended before.
        """
        return self.topology._spawn(self, argv, env=env, **popen_kwargs)

    def exec(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout_s: float = 60.0,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a short command inside this host's namespace and wait for it (text I/O)."""
        proc = self.run(
            argv,
            env=env,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            out, err = proc.communicate(input=input, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            kill_group(proc.pid, grace_s=1.0, poll=proc)
            proc.communicate()  # reap and close the pipes
            raise
        finally:
            self.topology._forget(proc)
        result = subprocess.CompletedProcess(list(argv), proc.returncode, out, err)
        if check and proc.returncode != 0:
            raise TopologyError(
                f"{list(argv)!r} on {self.name} exited {proc.returncode}: {err.strip()}"
            )
        return result

    def ping(self, address: str, *, timeout_s: float = 5.0) -> bool:
        """Send ICMP echo requests to ``address`` from this host until one is answered.

        Done in Python over a raw socket (we are root) so the tests need no ``ping``
        binary; retries every 0.2 s because the first packet can wait on ARP.
        """
        proc = self.exec(
            [sys.executable, "-I", "-S", "-c", _PING_SCRIPT, address, str(timeout_s)],
            check=False,
            timeout_s=timeout_s + 30.0,
        )
        return proc.returncode == 0


class Topology:
    """N host namespaces on a bridge in a fabric namespace, plus a veth to the root.

    Use as a context manager; ``close()`` is the same teardown and is idempotent.
    """

    def __init__(
        self,
        n_hosts: int,
        *,
        prefix: str | None = None,
        host_names: Sequence[str] | None = None,
        subnet: str | None = None,
        grace_s: float = 5.0,
        handle_sigterm: bool = True,
    ) -> None:
        if not 1 <= n_hosts <= 200:
            raise TopologyError(f"n_hosts must be 1..200, got {n_hosts}")
        self.prefix = prefix or _default_prefix()
        if not _NAME_RE.match(self.prefix):
            raise TopologyError(
                f"prefix {self.prefix!r} must be 1-14 characters of [A-Za-z0-9_-] "
                "(interface names are limited to 15)"
            )
        names = list(host_names) if host_names is not None else [f"host{i}" for i in range(n_hosts)]
        if len(names) != n_hosts or len(set(names)) != n_hosts:
            raise TopologyError("host_names must be n_hosts distinct names")
        self._names = names
        self._requested_subnet = ipaddress.IPv4Network(subnet) if subnet else None
        self.grace_s = grace_s
        self.fabric_netns = f"{self.prefix}-fab"
        self.root_veth = f"{self.prefix}c"
        self.subnet: ipaddress.IPv4Network | None = None
        self.controller_address = ""
        self.hosts: list[Host] = []
        self._handle_sigterm = handle_sigterm
        self._sigterm_ref = False
        self._procs: list[subprocess.Popen[Any]] = []
        self._agents: dict[str, subprocess.Popen[Any]] = {}
        self._lock = threading.Lock()
        self._namespaces: list[str] = []
        self._open = False
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------

    def __enter__(self) -> Topology:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(raise_on_leftovers=exc is None)

    def open(self) -> None:
        if self._open or self._closed:
            raise TopologyError("a Topology is opened once")
        self._open = True
        with _OPEN_LOCK:
            _OPEN.add(self)  # from here on, atexit closes it if nobody else does
        try:
            with blocked_signals():
                self._build()
                self._install_sigterm()
        except BaseException:  # includes a Ctrl-C delivered as the signals unblock
            self.close(raise_on_leftovers=False)
            raise

    def close(self, *, raise_on_leftovers: bool = True) -> None:
        """Kill our processes, remove our namespaces and veth; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        with blocked_signals():
            self._restore_sigterm()
            self._teardown()
            left = leftovers(self.prefix)
            if left:
                # One more pass: a namespace can stay busy for a moment after its last
                # process exits.
                time.sleep(0.2)
                self._teardown()
                left = leftovers(self.prefix)
        if left and raise_on_leftovers:
            raise TopologyError(f"teardown left {left}")

    # -- queries -----------------------------------------------------------------------

    def host(self, key: str | int) -> Host:
        if isinstance(key, int):
            return self.hosts[key]
        for h in self.hosts:
            if h.name == key:
                return h
        raise KeyError(key)

    @property
    def namespaces(self) -> list[str]:
        return list(self._namespaces)

    # -- agents (generic process management; the argv shape lives in one place) --------

    def agent_argv(
        self,
        host: Host,
        *,
        controller_port: int,
        join_token: str,
        data_dir: str | os.PathLike[str],
        executable: str | None = None,
        extra: Sequence[str] = (),
    ) -> list[str]:
        """The command line that starts an edgevisor agent for ``host``."""
        exe = executable or str(Path(sys.executable).with_name("edgevisor"))
        return [
            exe,
            "agent",
            "--controller",
            f"http://{self.controller_address}:{controller_port}",
            "--host",
            host.name,
            "--join-token",
            join_token,
            "--data-dir",
            os.fspath(data_dir),
            *extra,
        ]

    def start_agent(
        self,
        host: Host,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        **popen_kwargs: Any,
    ) -> subprocess.Popen[Any]:
        """Start ``argv`` as ``host``'s agent; refuses while a previous one still runs."""
        old = self._agents.get(host.name)
        if old is not None and old.poll() is None:
            raise TopologyError(f"an agent is already running on {host.name} (pid {old.pid})")
        proc = host.run(argv, env=env, **popen_kwargs)
        self._agents[host.name] = proc
        return proc

    def stop_agent(self, host: Host, *, grace_s: float | None = None) -> int | None:
        """SIGTERM the agent's process group, SIGKILL after the grace; its exit code."""
        proc = self._agents.pop(host.name, None)
        if proc is None:
            return None
        kill_group(proc.pid, grace_s=self.grace_s if grace_s is None else grace_s, poll=proc)
        self._forget(proc)
        return proc.returncode

    def agent(self, host: Host) -> subprocess.Popen[Any] | None:
        return self._agents.get(host.name)

    # -- internals ---------------------------------------------------------------------

    def _spawn(
        self,
        host: Host,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None,
        **popen_kwargs: Any,
    ) -> subprocess.Popen[Any]:
        if not self._open or self._closed:
            raise TopologyError("topology is not open")
        # Own process group so teardown can kill the whole tree by pgid (== pid).
        popen_kwargs["start_new_session"] = True
        with self._lock:
            proc: subprocess.Popen[Any] = subprocess.Popen(
                netns_exec_argv(host.netns, argv),
                env=dict(env) if env is not None else None,
                **popen_kwargs,
            )
            self._procs.append(proc)
        return proc

    def _forget(self, proc: subprocess.Popen[Any]) -> None:
        with self._lock, contextlib.suppress(ValueError):
            self._procs.remove(proc)

    def _build(self) -> None:
        fab = self.fabric_netns
        self._add_netns(fab)
        ip("link", "set", "lo", "up", netns=fab)
        ip("link", "add", "br0", "type", "bridge", "forward_delay", "0", netns=fab)
        ip("link", "set", "br0", "up", netns=fab)
        with _subnet_lock():
            self.subnet = self._pick_subnet()
            base = self.subnet.network_address
            self.controller_address = str(base + 1)
            ip("link", "add", self.root_veth, "type", "veth", "peer", "name", "ctl", "netns", fab)
            _disable_ipv6(self.root_veth)
            ip("addr", "add", f"{self.controller_address}/24", "dev", self.root_veth)
            ip("link", "set", self.root_veth, "up")
        ip("link", "set", "ctl", "master", "br0", "up", netns=fab)
        for i, name in enumerate(self._names):
            ns = f"{self.prefix}-h{i}"
            self._add_netns(ns)
            ip("link", "set", "lo", "up", netns=ns)
            ip(
                "link",
                "add",
                f"h{i}",
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                ns,
                netns=fab,
            )
            ip("link", "set", f"h{i}", "master", "br0", "up", netns=fab)
            addr = str(base + _FIRST_HOST_OCTET + i)
            ip("addr", "add", f"{addr}/24", "dev", "eth0", netns=ns)
            ip("link", "set", "eth0", "up", netns=ns)
            self.hosts.append(Host(name=name, index=i, netns=ns, address=addr, topology=self))

    def _add_netns(self, name: str) -> None:
        netns_add(name)
        self._namespaces.append(name)

    def _pick_subnet(self) -> ipaddress.IPv4Network:
        used = _root_networks()
        if self._requested_subnet is not None:
            net = self._requested_subnet
            if net.prefixlen != 24:
                raise TopologyError(f"subnet must be a /24, got {net}")
            if any(net.overlaps(u) for u in used):
                raise TopologyError(f"subnet {net} overlaps a root-namespace network")
            return net
        free = [n for n in SUPERNET.subnets(new_prefix=24) if not any(n.overlaps(u) for u in used)]
        if not free:
            raise TopologyError(f"no free /24 left in {SUPERNET}")
        # Random rather than first-free so a leftover of a crashed run is not reused at once.
        return free[secrets.randbelow(len(free))]

    def _teardown(self) -> None:
        with self._lock:
            procs = list(self._procs)
        for proc in procs:
            if proc.poll() is None or group_exists(proc.pid):
                kill_group(proc.pid, grace_s=self.grace_s, poll=proc)
            self._forget(proc)
        self._agents.clear()
        # Anything still inside our namespaces descends from what we started (it escaped
        # its process group, e.g. by setsid): kill it by pid so the namespaces can go.
        ours = [ns for ns in netns_list() if ns.startswith(f"{self.prefix}-")]
        kill_netns_processes(ours)
        link_delete(self.root_veth)
        for ns in ours:
            netns_delete(ns)

    def _install_sigterm(self) -> None:
        with _OPEN_LOCK:
            if not self._handle_sigterm:
                return
            self._sigterm_ref = True
            _SIGTERM_USERS[0] += 1
            if _SIGTERM_USERS[0] > 1 or _SAVED_SIGTERM:
                return
            if threading.current_thread() is not threading.main_thread():
                return
            if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
                return  # someone else owns SIGTERM; leave it to them
            _SAVED_SIGTERM.append(signal.signal(signal.SIGTERM, _on_sigterm))

    def _restore_sigterm(self) -> None:
        with _OPEN_LOCK:
            _OPEN.discard(self)
            if not self._sigterm_ref:
                return
            self._sigterm_ref = False
            _SIGTERM_USERS[0] -= 1
            if _SIGTERM_USERS[0] == 0 and _SAVED_SIGTERM:
                with contextlib.suppress(ValueError):  # not the main thread
                    signal.signal(signal.SIGTERM, _SAVED_SIGTERM.pop())


# SIGTERM -> KeyboardInterrupt while any topology is open, so `with` blocks unwind and
# tear down; one handler for all open topologies, restored when the last one closes.
_OPEN: set[Topology] = set()
_OPEN_LOCK = threading.RLock()
_SIGTERM_USERS = [0]
_SAVED_SIGTERM: list[Any] = []


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@atexit.register
def _close_forgotten() -> None:
    """A topology opened without ``with`` and never closed is closed at exit."""
    with _OPEN_LOCK:
        forgotten = list(_OPEN)
    for topo in forgotten:
        with contextlib.suppress(Exception):
            topo.close(raise_on_leftovers=False)


class AsyncTopology(Topology):
    """``async with AsyncTopology(n)``: the same, usable from a coroutine.

    Setup and teardown run on the event loop's thread and block it (well under a second
    for a few hosts): doing them in a worker thread would let a cancellation abandon a
    half-built or half-removed topology.
    """

    async def __aenter__(self) -> AsyncTopology:
        self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(raise_on_leftovers=exc is None)


# -- module helpers --------------------------------------------------------------------


def _root_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network configured on a root-namespace interface."""
    out = ip("-4", "-o", "addr", "show", check=False)
    nets = []
    for line in out.splitlines():
        toks = line.split()
        if "inet" in toks:
            nets.append(ipaddress.IPv4Interface(toks[toks.index("inet") + 1]).network)
    return nets


def _disable_ipv6(ifname: str) -> None:
    # Keeps router solicitations and MLD reports of the root veth out of the fabric.
    with contextlib.suppress(OSError):
        Path(f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6").write_text("1")


@contextlib.contextmanager
def _subnet_lock() -> Iterator[None]:
    """Serialise /24 picking across processes on this machine (held until the addr exists)."""
    _LOCK_PATH.parent.mkdir(parents=True, exist_ok=True)
    with open(_LOCK_PATH, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)

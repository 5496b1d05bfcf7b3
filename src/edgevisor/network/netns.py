"""Network namespaces and instance veths.

An *instance* is a network namespace behind a veth pair: the host end (named by
:func:`instance_ifname`) stays in the host namespace, the other end is ``eth0`` inside the
instance. The instance holds only its logical address as a ``/32`` and a default route via
the link-local gateway :data:`GATEWAY` (``onlink``), which every host-side veth carries;
so an instance cannot tell which host it is on and sees no host or physical address.

Namespace entry is per thread (``setns(2)`` changes only the calling thread), so
:func:`call_in` runs a function in a short-lived thread that entered the namespace;
sockets created there stay bound to it. Setup and teardown use the ``ip`` command: they
are not on a hot path and ``ip`` is the most predictable tool for them.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import TypeVar

from edgevisor.errors import UnavailableError

__all__ = [
    "GATEWAY",
    "GATEWAY6",
    "Fabric",
    "Instance",
    "NetnsError",
    "call_in",
    "create_instance",
    "create_netns",
    "delete_netns",
    "entered",
    "instance_ifname",
    "ip",
    "netns_exists",
    "prepare_host",
    "remove_instance",
    "rename_link",
]

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
NETNS_DIR = "/var/run/netns"
GATEWAY = IPv4Address("169.254.0.1")
#: The IPv6 instances' gateway: link-local, on every host-side veth of an IPv6 instance.
GATEWAY6 = IPv6Address("fe80::1")
_libc = ctypes.CDLL(None, use_errno=True)


class NetnsError(UnavailableError):
    """A namespace or link operation failed."""

    code = "netns_failed"


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise NetnsError(f"setns failed: {os.strerror(err)}")


@contextlib.contextmanager
def entered(name: str | None) -> Iterator[None]:
    """Move the *calling thread* into netns ``name`` for the block (``None``: stay)."""
    if name is None:
        yield
        return
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(os.path.join(NETNS_DIR, name), os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(own)


def call_in(name: str | None, fn: Callable[[], T]) -> T:
    """Run ``fn`` in netns ``name`` (in a helper thread) and return its result."""
    if name is None:
        return fn()
    box: dict[str, T] = {}
    errors: list[BaseException] = []

    def target() -> None:
        try:
            with entered(name):
                box["v"] = fn()
        except BaseException as exc:  # re-raised in the caller's thread
            errors.append(exc)

    thread = threading.Thread(target=target, name=f"netns-{name}")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return box["v"]


def ip(*args: str, netns: str | None = None, check: bool = True) -> str:
    """Run ``ip [-n NETNS] ARGS``; raise :class:`NetnsError` on failure."""
    cmd = ["ip", *(["-n", netns] if netns else []), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise NetnsError(f"{' '.join(cmd)}: {proc.stderr.strip()}")
    return proc.stdout


def ip_batch(lines: list[str], *, netns: str | None = None) -> None:
    """Run several ``ip`` commands in one process (``ip -batch``): a domain's switch builds
    its namespace on the critical path, and each ``ip`` process costs ~10 ms."""
    cmd = ["ip", *(["-n", netns] if netns else []), "-batch", "-"]
    proc = subprocess.run(
        cmd, input="\n".join(lines) + "\n", capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise NetnsError(f"{' '.join(cmd)} ({'; '.join(lines)}): {proc.stderr.strip()}")


def sysctl(netns: str | None, key: str, value: str) -> None:
    """Set a sysctl inside ``netns`` (``/proc/sys/net`` is per namespace)."""
    path = "/proc/sys/" + key.replace(".", "/")

    def write() -> None:
        with open(path, "w") as f:
            f.write(value)

    # /proc/sys/net follows the netns of the thread that opens it.
    call_in(netns, write)


def prepare_host(netns: str | None = None) -> None:
    """Kernel settings the dataplane needs on a host (the agent calls this at start)."""
    sysctl(netns, "net.ipv4.ip_forward", "1")
    # Instance traffic is routed by mark through per-account tables; strict reverse-path
    # filtering looks in the main table and would drop it.
    sysctl(netns, "net.ipv4.conf.all.rp_filter", "0")
    sysctl(netns, "net.ipv4.conf.default.rp_filter", "0")
    # Granted host services answer instances: their sockets take the account mark of the
    # SYN, so replies route through the account's table.
    sysctl(netns, "net.ipv4.tcp_fwmark_accept", "1")
    # IPv6 instances route the same way (tcp_fwmark_accept covers IPv6 too; there is no
    # IPv6 rp_filter). Forwarding also stops the host from taking router adverts.
    # (Whether /proc/sys has IPv6 does not depend on the namespace.)
    if os.path.exists("/proc/sys/net/ipv6/conf/all/forwarding"):
        sysctl(netns, "net.ipv6.conf.all.forwarding", "1")


def netns_exists(name: str) -> bool:
    return os.path.exists(os.path.join(NETNS_DIR, name))


def create_netns(name: str, *, lo_up: bool = True) -> None:
    ip("netns", "add", name)
    if lo_up:
        ip("link", "set", "lo", "up", netns=name)


def delete_netns(name: str) -> None:
    """Delete a namespace; its veths, addresses and nft tables go with it. Idempotent."""
    if netns_exists(name):
        ip("netns", "del", name, check=False)


def instance_ifname(account: str, logical: IPv4Address | IPv6Address) -> str:
    """The host-side veth name of the instance holding ``logical`` in ``account``.

    Derived from the address, not the instance, so the dataplane can name it from a
    record alone; 14 characters (IFNAMSIZ is 16 with the NUL).
    """
    digest = hashlib.blake2b(f"{account}\0{logical}".encode(), digest_size=6).hexdigest()
    return "ev" + digest


@dataclass(frozen=True, slots=True)
class Instance:
    """An instance namespace plugged into a host namespace."""

    netns: str
    host_netns: str | None
    ifname: str
    logical: IPv4Address | IPv6Address


def create_instance(
    netns: str,
    host_netns: str | None,
    account: str,
    logical: IPv4Address | IPv6Address,
    *,
    ifname: str | None = None,
) -> Instance:
    """Create netns ``netns`` behind a veth in ``host_netns`` holding only ``logical``.

    ``ifname`` names the host side instead of :func:`instance_ifname` (a namespace built
    ahead of time under a name of its own, renamed with :func:`rename_link` when used).
    """
    ifname = ifname or instance_ifname(account, logical)
    create_netns(netns, lo_up=logical.version == 6)  # v4: lo comes up in the batch below
    if logical.version == 6:
        try:
            _plug_v6(netns, host_netns, ifname, logical)
        except BaseException:
            delete_netns(netns)
            raise
        return Instance(netns=netns, host_netns=host_netns, ifname=ifname, logical=logical)
    try:
        ip_batch([f"link add {ifname} type veth peer name eth0 netns {netns}",
                  f"addr add {GATEWAY}/32 dev {ifname}",
                  f"link set {ifname} up"], netns=host_netns)
        # Replies are routed by mark into the account's table; strict reverse-path
        # filtering would look in the main table and drop them.
        sysctl(host_netns, f"net.ipv4.conf.{ifname}.rp_filter", "0")
        ip_batch(["link set lo up",
                  f"addr add {logical}/32 dev eth0",
                  "link set eth0 up",
                  f"route add {GATEWAY}/32 dev eth0 scope link",
                  f"route add default via {GATEWAY} dev eth0"], netns=netns)
    except BaseException:
        delete_netns(netns)
        raise
    return Instance(netns=netns, host_netns=host_netns, ifname=ifname, logical=logical)


def _plug_v6(netns: str, host_netns: str | None, ifname: str, logical: IPv6Address) -> None:
    """An IPv6 instance: ``logical/128`` inside, default route via :data:`GATEWAY6` on the
    host-side veth. Addresses skip duplicate detection (``nodad``): the controller
    guarantees uniqueness, and a tentative address would delay the first packets ~1 s."""
    ip("link", "add", ifname, "type", "veth", "peer", "name", "eth0", "netns", netns,
       netns=host_netns)
    ip("-6", "addr", "add", f"{GATEWAY6}/64", "dev", ifname, "nodad", netns=host_netns)
    ip("link", "set", ifname, "up", netns=host_netns)
    ip("-6", "addr", "add", f"{logical}/128", "dev", "eth0", "nodad", netns=netns)
    ip("link", "set", "eth0", "up", netns=netns)
    ip("-6", "route", "add", "default", "via", str(GATEWAY6), "dev", "eth0", netns=netns)


def rename_link(old: str, new: str, *, netns: str | None = None, then: Sequence[str] = ()) -> None:
    """Rename interface ``old`` to ``new`` keeping its addresses, state and sysctls, then
    run the ``ip`` commands ``then`` (e.g. a route over ``new``), all in one ``ip``
    process. Kernels that refuse to rename an interface that is up (EBUSY) get it taken
    down, renamed and brought up again."""
    try:
        ip_batch([f"link set {old} name {new}", *then], netns=netns)
    except NetnsError as exc:
        if "busy" not in str(exc).lower():
            raise
        ip_batch([f"link set {old} down", f"link set {old} name {new}",
                  f"link set {new} up", *then], netns=netns)  # fmt: skip


def remove_instance(instance: Instance) -> None:
    """Remove the instance namespace (its veth pair goes with it). Idempotent."""
    delete_netns(instance.netns)


class Fabric:
    """Simulated hosts for tests and benches: host namespaces joined by a bridge.

    The bridge lives in its own namespace ``<prefix>-fab``; host ``i`` is namespace
    ``<prefix>-h<i>`` with ``fabric_if`` holding ``<subnet>.0.<i>/16`` (default
    10.250.0.0/16). Nothing is added to the namespace the caller runs in.
    :meth:`destroy` removes every namespace it created (instances included).
    """

    def __init__(self, prefix: str, *, fabric_if: str = "fab0", subnet: str = "10.250") -> None:
        self.prefix = prefix
        self.fabric_if = fabric_if
        self.subnet = subnet
        self.namespaces: list[str] = []
        self.fabric_ns = f"{prefix}-fab"
        self._add_ns(self.fabric_ns)
        try:
            ip("link", "add", "br0", "type", "bridge", netns=self.fabric_ns)
            ip("link", "set", "br0", "up", netns=self.fabric_ns)
        except BaseException:
            self.destroy()
            raise

    def _add_ns(self, name: str) -> None:
        create_netns(name)
        self.namespaces.append(name)

    def host_ns(self, i: int) -> str:
        return f"{self.prefix}-h{i}"

    def host_address(self, i: int) -> IPv4Address:
        return IPv4Address(f"{self.subnet}.0.{i}")

    def add_host(self, i: int) -> str:
        ns = self.host_ns(i)
        self._add_ns(ns)  # recorded before configuring, so destroy() removes it on failure
        port = f"p{i}"
        ip("link", "add", port, "type", "veth", "peer", "name", self.fabric_if, "netns", ns,
           netns=self.fabric_ns)
        ip("link", "set", port, "master", "br0", "up", netns=self.fabric_ns)
        ip("addr", "add", f"{self.host_address(i)}/16", "dev", self.fabric_if, netns=ns)
        ip("link", "set", self.fabric_if, "up", netns=ns)
        prepare_host(ns)
        return ns

    def add_instance(
        self, name: str, host: int, account: str, logical: IPv4Address | IPv6Address
    ) -> Instance:
        ns = f"{self.prefix}-{name}"
        inst = create_instance(ns, self.host_ns(host), account, logical)
        self.namespaces.append(ns)
        return inst

    def destroy(self) -> None:
        for ns in reversed(self.namespaces):
            delete_netns(ns)
        self.namespaces.clear()

"""The host objects of a domain: volume backend, network namespace, cgroups, stale clearing.

:class:`LocalVolumes` stands in for the ``volumes`` capability (same calling convention)
where an agent runs without it. :func:`create_domain_netns` is the one place a domain's
network is built. :func:`clear_stale` runs at agent start and removes what a previous run
of the same agent left: its domains' cgroups (processes killed first), namespaces, and the
attachments of their volumes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import os
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any, Protocol

from edgevisor.errors import NotFound, UnavailableError
from edgevisor.migration.domain_parts import cgroup_parent, netns_prefix
from edgevisor.network import netns as nn
from edgevisor.storage.attach import AttachedVolume, AttachSettings, recover_stale
from edgevisor.storage.fuse_spare import SpareFuse
from edgevisor.storage.volume import DEFAULT_BLOCK_SIZE, Volume
from edgevisor.tasks.cgroups import CGROUP_ROOT, CONTROLLERS, CgroupSet

__all__ = [
    "DomainError",
    "LocalVolumes",
    "StaleReport",
    "VolumeBackend",
    "activate_domain_netns",
    "checkpoint_journal",
    "clear_stale",
    "create_domain_netns",
    "delete_link",
    "domain_cgroup",
    "mount_holders",
    "remove_domain_netns",
    "remove_host_cgroups",
    "retire_link",
    "route_domain_address",
    "seal_readonly",
    "set_freezer",
    "stage_domain_netns",
    "syncfs",
    "unmount",
]

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


class DomainError(UnavailableError):
    """A domain could not be started or stopped (sandbox, network, cgroups, volume)."""

    code = "domain_failed"


# -- volumes --------------------------------------------------------------------------------


class VolumeBackend(Protocol):
    """The part of the ``volumes`` capability a domain uses (same signatures)."""

    async def create(
        self, name: str, size_bytes: int, *, account: str, block_size: int = DEFAULT_BLOCK_SIZE
    ) -> dict[str, Any]: ...

    async def attach(self, name: str, target: Path, *, mount_ns: Path | None = None) -> Any: ...

    async def detach(self, name: str) -> Any: ...

    async def remove(self, name: str) -> Any: ...

    def info(self, name: str) -> dict[str, Any]: ...


class LocalVolumes:
    """Stand-in for the ``volumes`` capability: Volume + AttachedVolume under ``root``.

    Same calling convention: ``create`` takes the name in the account, every other method
    the id ``<account>.<name>``. ``<root>/<id>/`` is the volume, ``<root>/.attach/<id>/``
    its attachment state.
    """

    def __init__(
        self, root: Path, settings: AttachSettings | None = None, spares: SpareFuse | None = None
    ) -> None:
        self.root = root
        self.attach_dir = root / ".attach"
        self.settings = settings or AttachSettings()
        self.spares = spares  # owned by the caller, who closes it (or :meth:`close`)

    def close(self) -> None:
        """Kill the spare FUSE process, if one was given; attachments stay."""
        if self.spares is not None:
            self.spares.close()

    def _path(self, name: str) -> Path:
        return self.root / name

    def _attached(self, name: str, target: Path | None = None) -> AttachedVolume:
        return AttachedVolume(
            name,
            state_dir=self.attach_dir,
            target=target or self.root / name / "unused-target",
            kind="volume",
            arg=str(self._path(name)),
            settings=self.settings,
            spares=self.spares,
        )

    async def create(
        self, name: str, size_bytes: int, *, account: str, block_size: int = DEFAULT_BLOCK_SIZE
    ) -> dict[str, Any]:
        self.root.mkdir(parents=True, exist_ok=True)
        vid = f"{account}.{name}"
        vol = await asyncio.to_thread(Volume.create, self._path(vid), size_bytes, block_size)
        vol.close()
        return self.info(vid)

    async def attach(self, name: str, target: Path, *, mount_ns: Path | None = None) -> Any:
        return await self._attached(name, target).attach()

    async def detach(self, name: str) -> Any:
        await self._attached(name).detach()

    async def remove(self, name: str) -> Any:
        await self.detach(name)
        await asyncio.to_thread(shutil.rmtree, self._path(name), True)

    def info(self, name: str) -> dict[str, Any]:
        path = self._path(name)
        if not (path / "data").exists():
            raise NotFound(f"volume {name!r} not found")
        return {"id": name, "path": str(path), "size_bytes": (path / "data").stat().st_size}

    async def clear_stale(self) -> None:
        if self.attach_dir.is_dir():
            await recover_stale(self.attach_dir, settings=self.settings)


# -- network --------------------------------------------------------------------------------


def create_domain_netns(
    netns: str, account: str, address: IPv4Address, *, host_route: bool = True
) -> str:
    """The domain's network namespace behind a veth; returns the host-side interface.

    The one place a domain's network is built. Inside: ``address/32`` on eth0, default
    route via the link-local gateway. With ``host_route`` (a test address): a /32 route
    to ``address`` over the veth in the host's main table. Without (a logical address):
    the address dataplane routes to the veth in the account's own table (logical
    addresses of different accounts may overlap), see ``AddressesCapability.plug``.
    """
    # Leftovers of the same names are ours (names are per agent). The host end of a veth
    # outlives its namespace for a moment (the kernel cleans namespaces up asynchronously),
    # so it is deleted by name; deleting one end removes the pair at once.
    remove_domain_netns(netns, nn.instance_ifname(account, address))
    inst = nn.create_instance(netns, None, account, address)
    if not host_route:
        return inst.ifname
    try:
        route_domain_address(address, inst.ifname)
    except BaseException:
        remove_domain_netns(netns, inst.ifname)
        raise
    return inst.ifname


def stage_domain_netns(netns: str, account: str, address: IPv4Address, staged_ifname: str) -> None:
    """Build the domain's namespace ahead of its start (a migration's target, in
    prepare) with the host side of its veth named ``staged_ifname``, not its own name:
    that name derives from (account, address), and the running source may still hold it
    (on one machine, simulated hosts share the root namespace). Nothing is routed to it
    yet. :func:`activate_domain_netns` gives it its name when the domain starts."""
    remove_domain_netns(netns, staged_ifname)  # leftovers of ours (names are per agent)
    nn.create_instance(netns, None, account, address, ifname=staged_ifname)


def activate_domain_netns(
    staged_ifname: str, account: str, address: IPv4Address, *, host_route: bool = True
) -> str:
    """Rename a staged veth to the domain's own name (and, with ``host_route``, route
    the test address over it); returns the name. A leftover of that name is ours: the
    source removed its veth when it quiesced.

    Two rtnetlink requests from this process (well under a millisecond) rather than an
    ``ip`` process (5-25 ms of a CPU the switch's mount needs too); a kernel that refuses
    to rename a link that is up (EBUSY), or a staged link that is missing, takes the
    ``ip`` path (:func:`~edgevisor.network.netns.rename_link`: down, rename, up; its
    error names what is wrong)."""
    ifname = nn.instance_ifname(account, address)
    if _link_exists(ifname):
        nn.ip("link", "del", ifname, check=False)
    route = [f"route replace {address}/32 dev {ifname} src {nn.GATEWAY}"] if host_route else []
    try:
        renamed = _rename_link(staged_ifname, ifname)
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise
        renamed = False
    if not renamed:
        nn.rename_link(staged_ifname, ifname, then=route)
        return ifname
    if host_route:
        _replace_host_route(address, ifname, nn.GATEWAY)
    return ifname


def route_domain_address(address: IPv4Address, ifname: str) -> None:
    """The host's /32 route to a domain's test address over its veth ``ifname``.

    Separate from :func:`create_domain_netns` so a namespace can be built ahead of time
    (a migration's target) and draw the address's traffic only when the domain starts.
    """
    nn.ip("route", "replace", f"{address}/32", "dev", ifname, "src", str(nn.GATEWAY))


def remove_domain_netns(netns: str, ifname: str | None = None) -> None:
    """Remove the namespace; with ``ifname``, its veth pair (and host route) right away.

    One ``ip`` process for both (each costs ~10 ms, on a switch's critical path), and
    none for what does not exist."""
    lines = []
    if ifname is not None and _link_exists(ifname):
        lines.append(f"link del {ifname}")
    if nn.netns_exists(netns):
        lines.append(f"netns del {netns}")
    if lines:
        # -force: one line failing (gone meanwhile) does not skip the other
        subprocess.run(["ip", "-force", "-batch", "-"], input="\n".join(lines) + "\n",
                       capture_output=True, text=True, check=False)  # fmt: skip


_RTM_NEWLINK, _RTM_DELLINK = 16, 17
_NLM_F_REQUEST_ACK = 0x1 | 0x4
_NLMSG_ERROR = 2
_IFLA_IFNAME = 3
_IFF_UP = 0x1


def _link_request(kind: int, ifname: str, attrs: bytes = b"", change: int = 0) -> bool:
    """One rtnetlink request on link ``ifname`` (this thread's network namespace),
    waiting for its ack; False when there is no such link.

    Raw rather than pyroute2: this is on the switch's critical path, and an ``IPRoute``
    with its ``link_lookup`` (a dump of every link) took ~3 ms here for one rename."""
    try:
        index = socket.if_nametoindex(ifname)
    except OSError:
        return False
    # nlmsghdr (len, type, flags, seq, pid) + ifinfomsg (family, type, index, flags, change)
    body = struct.pack("=BxHiII", socket.AF_UNSPEC, 0, index, 0, change) + attrs
    msg = struct.pack("=IHHII", 16 + len(body), kind, _NLM_F_REQUEST_ACK, 1, 0) + body
    err = _netlink_ack(msg, f"link {ifname}")
    if err == errno.ENODEV:
        return False
    if err:
        raise OSError(err, f"link {ifname}: {os.strerror(err)}")
    return True


def _netlink_ack(msg: bytes, what: str) -> int:
    """Send one rtnetlink request (this thread's network namespace) and return the
    errno of its ack (0: done)."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as nl:
        nl.sendto(msg, (0, 0))
        reply = nl.recv(4096)
    if len(reply) >= 20 and struct.unpack_from("=H", reply, 4)[0] == _NLMSG_ERROR:
        return int(-struct.unpack_from("=i", reply, 16)[0])
    raise OSError(errno.EPROTO, f"{what}: unexpected rtnetlink answer")


def _rta(kind: int, payload: bytes) -> bytes:
    rta = struct.pack("=HH", 4 + len(payload), kind) + payload
    return rta + b"\0" * (-len(rta) % 4)


def _rename_link(ifname: str, new_name: str) -> bool:
    """Rename link ``ifname`` to ``new_name``, its state (up) kept; False when there is
    no such link. EBUSY (a kernel that renames only links that are down) is raised."""
    return _link_request(_RTM_NEWLINK, ifname, _name_attr(new_name))


def _name_attr(name: str) -> bytes:
    return _rta(_IFLA_IFNAME, name.encode() + b"\0")


_RTM_NEWROUTE = 24
_NLM_F_REPLACE, _NLM_F_CREATE = 0x100, 0x400
_RTA_DST, _RTA_OIF, _RTA_PREFSRC = 1, 4, 7
_RT_TABLE_MAIN, _RTPROT_BOOT, _RT_SCOPE_LINK, _RTN_UNICAST = 254, 3, 253, 1


def _replace_host_route(address: IPv4Address, ifname: str, src: IPv4Address) -> None:
    """``ip route replace ADDRESS/32 dev IFNAME src SRC`` as one rtnetlink request."""
    index = socket.if_nametoindex(ifname)
    # rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags
    body = struct.pack(
        "=BBBBBBBBI", socket.AF_INET, 32, 0, 0, _RT_TABLE_MAIN, _RTPROT_BOOT,
        _RT_SCOPE_LINK, _RTN_UNICAST, 0,
    )  # fmt: skip
    body += _rta(_RTA_DST, address.packed) + _rta(_RTA_OIF, struct.pack("=i", index))
    body += _rta(_RTA_PREFSRC, src.packed)
    flags = _NLM_F_REQUEST_ACK | _NLM_F_CREATE | _NLM_F_REPLACE
    msg = struct.pack("=IHHII", 16 + len(body), _RTM_NEWROUTE, flags, 1, 0) + body
    err = _netlink_ack(msg, f"route to {address}")
    if err:
        raise OSError(err, f"route {address}/32 dev {ifname}: {os.strerror(err)}")


def delete_link(ifname: str) -> bool:
    """Delete the link ``ifname`` (and its veth peer); False when there is none. Takes
    the kernel ~15-20 ms (unregistering waits for RCU): not for a critical path."""
    return _link_request(_RTM_DELLINK, ifname)


def retire_link(ifname: str, new_name: str) -> bool:
    """Take link ``ifname`` down and rename it ``new_name`` in one netlink request
    (well under a millisecond, where deleting it costs ~15-20 ms): its routes go at once,
    and its name is free for the domain's next copy; deleting the namespace later takes
    it. False when there is no such link."""
    return _link_request(_RTM_NEWLINK, ifname, _name_attr(new_name), change=_IFF_UP)


def _link_exists(ifname: str) -> bool:
    """In this thread's network namespace (not /sys, which may show another's)."""
    try:
        socket.if_nametoindex(ifname)
    except OSError:
        return False
    return True


# -- cgroups --------------------------------------------------------------------------------


def domain_cgroup(host: str, tag: str, root: Path = CGROUP_ROOT) -> CgroupSet:
    cg = CgroupSet(tag, root)
    cg.paths = {c: root / c / cgroup_parent(host) / tag for c in CONTROLLERS}
    return cg


def _freezer_state(cg: CgroupSet) -> str:
    try:
        return (cg.paths["freezer"] / "freezer.state").read_text().strip()
    except OSError:
        return "THAWED"


async def set_freezer(cg: CgroupSet, state: str, timeout_s: float) -> None:
    path = cg.paths["freezer"] / "freezer.state"
    deadline = time.monotonic() + timeout_s
    delay = 0.0005  # on the switch's critical path: poll finely, back off if it takes long
    while True:
        path.write_text(state)  # a sysfs write: no blocking I/O worth a thread hop
        if _freezer_state(cg) == state:
            return
        if time.monotonic() > deadline:
            raise DomainError(f"cgroup did not reach {state} within {timeout_s} s")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.01)


def syncfs(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        os.close(fd)


_EXT4_IOC_CHECKPOINT = 0x4004662B  # _IOW('f', 43, __u32), Linux >= 5.13


def checkpoint_journal(path: Path) -> bool:
    """Commit the ext4 journal of the filesystem at ``path`` and write every block it
    holds to its home location (``EXT4_IOC_CHECKPOINT``), so a later unmount has (almost)
    nothing left to write. Writers wait while it runs, readers do not. False when the
    filesystem cannot (not ext4, or a kernel without the ioctl)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, _EXT4_IOC_CHECKPOINT, struct.pack("I", 0))
    except OSError as exc:
        if exc.errno in (errno.ENOTTY, errno.EOPNOTSUPP, errno.EINVAL):
            return False
        raise
    finally:
        os.close(fd)
    return True


_MS_RDONLY = 1
_MS_REMOUNT = 32


def seal_readonly(path: Path, *, busy_timeout_s: float = 0.0, poll_s: float = 0.001) -> bool:
    """Make the filesystem at ``path`` read-only (remount, mount(2)); False when nothing
    is mounted there.

    What a quiesce needs from an unmount at a fraction of its cost: ext4 writes its
    journal home and a clean superblock, and nothing writes the device afterwards; the
    unmount itself (which also evicts every cached inode, hundreds of ms for a large
    cache) can then run later, off the switch's critical path. A remount is refused
    (EBUSY) while a file is open for writing; that is retried for ``busy_timeout_s``
    (a writer that is still exiting; first after ``poll_s``, then less and less often),
    then the error names who holds files there. The kernel's check covers every mount of
    the filesystem (a sandbox's bind of it too), so a success means no file on it is open
    for writing anywhere.
    """
    target = os.fsencode(os.path.abspath(path))

    def remount() -> int:
        if _libc.mount(None, target, None, _MS_REMOUNT | _MS_RDONLY, None) == 0:
            return 0
        err = ctypes.get_errno()
        return -1 if err == errno.EINVAL and not os.path.ismount(path) else err

    return _mount_call(remount, path, "make {} read-only", busy_timeout_s, poll_s)


def unmount(path: Path, *, busy_timeout_s: float = 0.0) -> bool:
    """Unmount the filesystem at ``path`` with umount(2) (no tool to start: this is on the
    switch's critical path); False when nothing is mounted there.

    EBUSY is retried for ``busy_timeout_s``: a reference can outlive the domain's
    processes for a moment (a file another process of this machine holds open in it for
    a short while: a scan of the directory tree, a forked child that has not closed the
    descriptors it inherited yet). If it stays busy, the error names who holds it.
    """
    target = os.fsencode(os.path.abspath(path))

    def umount() -> int:
        if _libc.umount2(target, 0) == 0:
            return 0
        err = ctypes.get_errno()
        return -1 if err == errno.EINVAL else err  # EINVAL: not a mount point

    return _mount_call(umount, path, "unmount {}", busy_timeout_s)


def _mount_call(
    call: Callable[[], int], path: Path, what: str, busy_timeout_s: float, poll_s: float = 0.001
) -> bool:
    """Run ``call`` (0: done, -1: nothing mounted, else an errno) and retry EBUSY for
    ``busy_timeout_s`` (first after ``poll_s``, backing off to 20 ms); a lasting error
    names the processes holding files under ``path``."""
    deadline = time.monotonic() + busy_timeout_s
    delay = poll_s
    while True:
        err = call()
        if err <= 0:
            return err == 0
        if err != errno.EBUSY or time.monotonic() >= deadline:
            break
        time.sleep(delay)
        delay = min(delay * 1.5, 0.02)
    why = os.strerror(err)
    if err == errno.EBUSY:
        holders = mount_holders(path)
        why += f" (held by {', '.join(holders)})" if holders else " (no process holds it)"
    raise DomainError(f"cannot {what.format(path)}: {why}")


def mount_holders(path: Path, limit: int = 8) -> list[str]:
    """``pid (comm)`` of processes whose cwd, root or open files lie under ``path`` (the
    diagnosis of a busy unmount, like ``fuser -m``; only on the failure path)."""
    root = os.path.abspath(path)
    found: list[str] = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or len(found) >= limit:
            continue
        links = [f"/proc/{entry.name}/cwd", f"/proc/{entry.name}/root"]
        with contextlib.suppress(OSError):
            links += [f"/proc/{entry.name}/fd/{fd}" for fd in os.listdir(f"/proc/{entry.name}/fd")]
        for link in links:
            try:
                where = os.readlink(link)
            except OSError:
                continue
            if where == root or where.startswith(root + "/"):
                try:
                    comm = Path(f"/proc/{entry.name}/comm").read_text().strip()
                except OSError:
                    comm = "?"
                found.append(f"{entry.name} ({comm}: {where})")
                break
    return found


# -- agent restart ----------------------------------------------------------------------------


@dataclass
class StaleReport:
    netns: list[str]
    cgroups: list[str]
    volumes: list[str]


async def clear_stale(
    host: str,
    volumes: VolumeBackend,
    attached: list[str],
    *,
    root: Path = CGROUP_ROOT,
    timeout_s: float = 20.0,
) -> StaleReport:
    """Clear what a previous run of this host's agent left: its domains' cgroups (processes
    killed), network namespaces, and the attachments of the volumes named in ``attached``.

    Run at agent start before any domain of this host runs: everything found is stale.
    """
    report = StaleReport([], [], [])
    parent = root / "freezer" / cgroup_parent(host)
    if parent.is_dir():
        for entry in sorted(parent.iterdir()):
            if entry.is_dir():
                await asyncio.to_thread(domain_cgroup(host, entry.name, root).remove, timeout_s)
                report.cgroups.append(entry.name)
    prefix = netns_prefix(host)
    if os.path.isdir(nn.NETNS_DIR):
        for name in sorted(os.listdir(nn.NETNS_DIR)):
            if name.startswith(prefix):
                await asyncio.to_thread(remove_domain_netns, name)
                report.netns.append(name)
    for vol in attached:
        with contextlib.suppress(NotFound):
            await volumes.detach(vol)
            report.volumes.append(vol)
    if isinstance(volumes, LocalVolumes):
        await volumes.clear_stale()
    return report


def remove_host_cgroups(host: str, root: Path = CGROUP_ROOT) -> None:
    """Remove the host's (empty) parent groups; at agent stop, once its domains are gone."""
    for c in CONTROLLERS:
        with contextlib.suppress(OSError):  # busy: a domain is still there
            (root / c / cgroup_parent(host)).rmdir()

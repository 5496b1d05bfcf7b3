"""Attach a volume to the host as a mounted filesystem: FUSE image -> loop device -> ext4.

Theory of operation
-------------------
An attachment is four layers, each built on the one before and torn down in reverse::

    detached --start FUSE--> imaged --losetup--> looped --mkfs? + mount--> mounted
       ^                                                                     |
       +------ fusermount3 -u <-- losetup -d <-- umount <--------------------+

``<state_dir>/<name>/`` holds the FUSE mountpoint (``fuse/``, the image is
``fuse/image``), the daemon's log and ``state.json`` (daemon pid, FUSE device number,
loop device, target, mount namespace). The JSON file is only a hint for recovery: every
step asks the kernel what exists (``/proc/self/mountinfo``, ``losetup --list``) and does
only what is missing, so :meth:`AttachedVolume.attach` and :meth:`AttachedVolume.detach`
are idempotent and can be re-run after a crash at any point.

When the FUSE process dies, its mount stays behind and every access fails with ENOTCONN;
the loop device above it keeps the image open and the ext4 mount keeps the loop device.
When it hangs, every access blocks. :func:`recover_stale` finds those by what the kernel
reports under ``state_dir`` (FUSE mounts that fail or do not answer statfs, loop devices
whose backing file is gone or sits on such a connection), kills a hung process that
``state.json`` names, and clears the rest top-down: unmount what sits on the loop device,
detach it, lazily unmount the FUSE mount. Live attachments are left alone. ``attach`` and
``detach`` run it for their own name when they meet a dead FUSE mount.

The host tools (mountinfo, losetup, blkid/mkfs, mount) live in
:mod:`edgevisor.storage.hostfs`; the mount step is a separate function there
(:func:`~edgevisor.storage.hostfs.mount_filesystem`) that can run inside another mount
namespace (``mount_ns=/proc/PID/ns/mnt``, through ``nsenter``).

A :class:`~edgevisor.storage.fuse_spare.SpareFuse` passed as ``spares`` lets
:func:`start_fuse` hand the arguments to a pre-started FUSE process instead of starting an
interpreter (~300 ms less per attach); its owner closes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgevisor.storage.fuse_process import lazy_unmount_fuse as _lazy_unmount_fuse
from edgevisor.storage.fuse_process import pid_alive as _pid_alive
from edgevisor.storage.fuse_process import probe_fuse_mount, start_fuse, stop_fuse
from edgevisor.storage.fuse_process import reap as _reap
from edgevisor.storage.fuse_spare import SpareFuse, holds_dev_fuse
from edgevisor.storage.hostfs import (
    AttachError,
    AttachSettings,
    FilesystemMismatch,
    MountEntry,
    detach_loop,
    ensure_filesystem,
    is_mounted,
    list_loop_devices,
    loop_backing_file,
    mount_at,
    mount_filesystem,
    read_mountinfo,
    run_tool,
    setup_loop,
    unmount_filesystem,
)

__all__ = [
    "AttachError",
    "AttachSettings",
    "AttachedVolume",
    "FilesystemMismatch",
    "RecoveryReport",
    "SpareFuse",
    "probe_fuse_mount",
    "recover_stale",
    "start_fuse",
    "stop_fuse",
]

log = logging.getLogger(__name__)

IMAGE_NAME = "image"  # same as fuse_image.IMAGE_NAME; not imported to keep pyfuse3 out
_STATE_FILE = "state.json"


# -- one attachment -----------------------------------------------------------------------


@dataclass
class _State:
    pid: int | None = None
    fuse_dev: str | None = None
    loop_device: str | None = None
    target: str | None = None
    mount_ns: str | None = None
    kind: str = ""
    arg: str = ""

    @classmethod
    def load(cls, path: Path) -> _State:
        try:
            raw: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError):
            return cls()
        known = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw}
        return cls(**known)

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.__dict__, indent=1))
        os.replace(tmp, path)


class AttachedVolume:
    """One volume exposed as ``target`` (ext4 on loop on ``<state_dir>/<name>/fuse/image``).

    ``kind``/``arg`` say how the FUSE process builds the device (see
    :func:`edgevisor.storage.fuse_image.resolve_device_factory`).
    """

    def __init__(
        self,
        name: str,
        *,
        state_dir: Path,
        target: Path,
        kind: str,
        arg: str,
        settings: AttachSettings | None = None,
        mount_ns: Path | None = None,
        spares: SpareFuse | None = None,
    ) -> None:
        if not name or "/" in name or name.startswith("."):
            raise AttachError(f"bad attachment name {name!r}")
        self.name = name
        self.dir = Path(os.path.abspath(state_dir)) / name
        self.fuse_dir = self.dir / "fuse"
        self.image = self.fuse_dir / IMAGE_NAME
        self.target = Path(os.path.abspath(target))
        self.kind = kind
        self.arg = arg
        self.settings = settings or AttachSettings()
        self.mount_ns = mount_ns
        self.spares = spares
        self._state_path = self.dir / _STATE_FILE
        self._state = _State.load(self._state_path)
        self.timings: dict[str, float] = {}
        self._staged = False  # this object brought FUSE and loop up with mount=False
        """Seconds per layer of the last :meth:`attach` (``fuse``, ``loop``, ``fs``,
        ``mount``; a layer already up is not timed): benchmarks report them."""

    @property
    def _source(self) -> tuple[str, str]:
        return self.kind, self.arg

    @property
    def pid(self) -> int | None:
        """The FUSE process, while attached."""
        return self._state.pid

    @property
    def loop_device(self) -> str | None:
        return self._state.loop_device

    @property
    def log_path(self) -> Path:
        return self.dir / "fuse.log"

    def _save(self) -> None:
        self._state.save(self._state_path)

    async def attach(self, *, mount: bool = True) -> bool:
        """Bring every layer up (only what is missing); True when a filesystem was created.

        ``mount=False`` stops after the loop device: no byte of the image is read, so the
        layers that cost a switch most (FUSE process, loop device) can be staged for a
        volume whose data is not final yet (a migration's target, before the source
        stops, if its reads are held until then); a later ``attach()`` adopts them and
        only checks and mounts the filesystem.
        """
        s = self.settings
        t = time.monotonic()
        self.timings = {}

        def mark(step: str) -> None:
            nonlocal t
            now = time.monotonic()
            self.timings[step] = now - t
            t = now

        if mount and self._staged and self._staged_layers_up():
            # Staged by this object (a migration's target, in prepare): only the mount
            # is missing. No statfs probe of the FUSE process, no loop scan, no separate
            # superblock check (the mount reads it): each is a thread hop or a FUSE round
            # trip inside the switch. A mount that fails (no filesystem yet, a FUSE
            # process that died since) takes the full path, which sorts it out.
            mark("adopt")
            try:
                return await self._mount(mark, check_fs=False)
            except AttachError as exc:
                log.info("mounting staged %s failed (%s); re-attaching", self.name, exc)
            self._staged = False
            t = time.monotonic()
        self.dir.mkdir(parents=True, exist_ok=True)
        fuse_target = str(self.fuse_dir)
        fuse_mount = mount_at(fuse_target) if self.fuse_dir.exists() else None
        health = (
            await probe_fuse_mount(self.fuse_dir, timeout_s=s.probe_timeout_s)
            if fuse_mount
            else None
        )
        if health is not None and health != "live":
            await recover_stale(self.dir.parent, settings=s, only=self.name)
            fuse_mount = None
        elif fuse_mount is not None and not (self._state.pid and _pid_alive(self._state.pid)):
            # a live mount whose process we do not know: not ours to adopt
            raise AttachError(f"{fuse_target} is mounted by an unknown process")
        elif fuse_mount is not None and (self._state.kind, self._state.arg) != self._source:
            raise AttachError(
                f"{self.name} is attached to {self._state.kind}:{self._state.arg}, "
                f"not {self.kind}:{self.arg}"
            )
        if fuse_mount is None:
            self._state = _State(kind=self.kind, arg=self.arg)
            self._state.pid = await start_fuse(
                self.fuse_dir,
                kind=self.kind,
                arg=self.arg,
                log_path=self.log_path,
                settings=s,
                fsname=f"edgevisor:{self.name}",
                spares=self.spares,
            )
            fuse_mount = mount_at(fuse_target)
            mark("fuse")
        self._state.fuse_dev = fuse_mount.dev if fuse_mount else None
        self._state.mount_ns = str(self.mount_ns) if self.mount_ns else None
        self._state.target = str(self.target)
        self._save()
        try:
            t = time.monotonic()  # the probe and state file count as neither layer
            self._state.loop_device = await setup_loop(self.image, settings=s)
            self._save()
            mark("loop")
            if not mount:
                log.info("staged %s: %s, not mounted", self.name, self._state.loop_device)
                self._staged = True
                return False
            return await self._mount(mark)
        except BaseException:
            with contextlib.suppress(Exception):
                await self.detach()
            raise

    def _staged_layers_up(self) -> bool:
        """The FUSE process and loop device this object staged are still there (a
        /proc and a sysfs read: neither reaches the FUSE process)."""
        st = self._state
        return bool(
            st.pid
            and _pid_alive(st.pid)
            and st.loop_device
            and loop_backing_file(st.loop_device) == str(self.image)
        )

    async def _mount(self, mark: Callable[[str], None], *, check_fs: bool = True) -> bool:
        """The filesystem on the loop device (created if none, unless not ``check_fs``),
        mounted at the target; True when it was created."""
        s, device = self.settings, self._state.loop_device
        assert device is not None
        created = False
        if check_fs:
            created = await ensure_filesystem(device, settings=s)
            mark("fs")
        await mount_filesystem(device, self.target, settings=s, mount_ns=self.mount_ns)
        mark("mount")
        self._staged = False
        log.info("attached %s: %s on %s", self.name, device, self.target)
        return created

    async def detach(self, *, force: bool = False) -> None:
        """Tear every layer down (only what exists). ``force`` unmounts a busy target lazily."""
        s = self.settings
        if (
            is_mounted(str(self.fuse_dir))
            and await probe_fuse_mount(self.fuse_dir, timeout_s=s.probe_timeout_s) != "live"
        ):
            # the FUSE process crashed or hangs: the layers above it cannot be taken down
            # the polite way (I/O fails or blocks), so clear them as stale
            await recover_stale(self.dir.parent, settings=s, only=self.name)
        loop_dev = self._state.loop_device or self._find_loop()
        if loop_dev is not None and loop_backing_file(loop_dev) != str(self.image):
            loop_dev = None  # detached already (its number may belong to someone else now)
        target = Path(self._state.target) if self._state.target else self.target
        if self.mount_ns is not None:
            await unmount_filesystem(target, settings=s, mount_ns=self.mount_ns, lazy=force)
        if loop_dev is not None:
            # every mount of our loop device here (the target, and any bind of it); never a
            # mount of something else that happens to sit on the target path
            for m in reversed(read_mountinfo()):
                if m.source == loop_dev:
                    await unmount_filesystem(Path(m.mount_point), settings=s, lazy=force)
            await detach_loop(loop_dev, settings=s)
            self._state.loop_device = None
            self._save()
        if self.fuse_dir.exists() or self._state.pid:
            await stop_fuse(self.fuse_dir, self._state.pid, settings=s)
        with contextlib.suppress(FileNotFoundError):
            self._state_path.unlink()
        self._state = _State()
        log.info("detached %s", self.name)

    def _find_loop(self) -> str | None:
        back = str(self.image)
        for name in sorted(os.listdir("/sys/block")):
            if name.startswith("loop") and loop_backing_file(f"/dev/{name}") == back:
                return f"/dev/{name}"
        return None


# -- recovery -----------------------------------------------------------------------------


@dataclass
class RecoveryReport:
    unmounted: list[str] = field(default_factory=list)
    detached_loops: list[str] = field(default_factory=list)
    cleared_fuse: list[str] = field(default_factory=list)
    killed: list[int] = field(default_factory=list)
    live: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.unmounted or self.detached_loops or self.cleared_fuse or self.killed)


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


async def recover_stale(
    state_dir: Path, *, settings: AttachSettings | None = None, only: str | None = None
) -> RecoveryReport:
    """Clear what crashed FUSE processes left under ``state_dir``; idempotent.

    Stale: a FUSE mount under ``state_dir`` that answers ENOTCONN (process gone) or does
    not answer at all (process hung: it is killed if ``state.json`` names it); a loop
    device whose backing file is under ``state_dir`` and is gone, or sits on a stale FUSE
    mount or on a FUSE connection that a state file records but no mount shows any more.
    ``only`` limits the work to one attachment name. Live attachments are reported, not
    touched.
    """
    s = settings or AttachSettings()
    report = RecoveryReport()
    root = os.path.abspath(state_dir)
    if only is not None:
        root = os.path.join(root, only)
    if not os.path.isdir(root):
        return report
    states: dict[str, _State] = {}
    for dirpath in [root] if only is not None else _subdirs(root):
        st = _State.load(Path(dirpath) / _STATE_FILE)
        states[os.path.join(dirpath, "fuse")] = st

    mounts = read_mountinfo()
    fuse_mounts = [m for m in mounts if m.fstype.startswith("fuse") and _under(m.mount_point, root)]
    stale_devs: set[str] = set()
    stale_fuse: list[MountEntry] = []
    live_devs: set[str] = set()
    for m in fuse_mounts:
        health = await probe_fuse_mount(Path(m.mount_point), timeout_s=s.probe_timeout_s)
        if health == "hung":
            hung = states.get(m.mount_point)
            if hung and hung.pid and _pid_alive(hung.pid) and _is_fuse_image_process(hung.pid):
                os.kill(hung.pid, signal.SIGKILL)
                report.killed.append(hung.pid)
                health = "dead"
        if health == "live":
            live_devs.add(m.dev)
            report.live.append(m.mount_point)
        else:
            stale_devs.add(m.dev)
            stale_fuse.append(m)
    # FUSE connections that state files recorded but no mount shows any more (unmounted
    # lazily by hand). Anonymous device numbers are reused, so a loop device on one of
    # them is ours only if it is also the recorded loop device and its file is an image.
    recorded = {
        (st.loop_device, st.fuse_dev)
        for st in states.values()
        if st.loop_device and st.fuse_dev and st.fuse_dev not in live_devs
    }

    for loop in await list_loop_devices(timeout_s=s.command_timeout_s):
        if loop.backing_dev in live_devs:
            continue
        on_stale = loop.backing_dev in stale_devs
        on_lost = (loop.device, loop.backing_dev) in recorded and (
            os.path.basename(loop.backing_file) == IMAGE_NAME
        )
        gone = _under(loop.backing_file, root) and not await _exists(loop.backing_file, s)
        if not (on_stale or on_lost or gone):
            continue
        for m in reversed(read_mountinfo()):
            if m.dev == loop.dev or m.source == loop.device:
                await _force_unmount(m.mount_point, s)
                report.unmounted.append(m.mount_point)
        for st in states.values():
            if st.loop_device == loop.device and st.mount_ns and st.target:
                with contextlib.suppress(AttachError):
                    await unmount_filesystem(
                        Path(st.target), settings=s, mount_ns=Path(st.mount_ns), lazy=True
                    )
        await detach_loop(loop.device, settings=s)
        report.detached_loops.append(loop.device)

    for m in stale_fuse:
        await _lazy_unmount_fuse(m.mount_point, s)
        report.cleared_fuse.append(m.mount_point)
    for fuse_dir, st in states.items():
        if fuse_dir in report.live:
            continue
        if st.pid:
            _reap(st.pid)
        if st.pid is None or not _pid_alive(st.pid):
            with contextlib.suppress(FileNotFoundError):
                (Path(fuse_dir).parent / _STATE_FILE).unlink()
    if report.changed:
        log.warning("recovered stale attachments under %s: %s", root, report)
    return report


def _subdirs(root: str) -> list[str]:
    try:
        return [e.path for e in os.scandir(root) if e.is_dir(follow_symlinks=False)]
    except OSError:
        return []


async def _exists(path: str, s: AttachSettings) -> bool:
    try:
        await asyncio.wait_for(asyncio.to_thread(os.stat, path), s.probe_timeout_s)
    except TimeoutError:
        return True  # hung, not gone: the hung-mount branch deals with it
    except OSError:
        return False
    return True


async def _force_unmount(target: str, s: AttachSettings) -> None:
    rc, _, _ = await run_tool(["umount", target], timeout_s=s.command_timeout_s, check=False)
    if rc != 0 and is_mounted(target):
        await run_tool(["umount", "-l", target], timeout_s=s.command_timeout_s)


def _is_fuse_image_process(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    if b"edgevisor.storage.fuse_image" not in cmdline:
        return False
    # a spare that never got its arguments serves no mount (and may be another agent's)
    return b"--spare" not in cmdline or holds_dev_fuse(pid)

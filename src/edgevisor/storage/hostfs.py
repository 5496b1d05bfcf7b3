"""Host tools for exposing volumes: mountinfo, loop devices, mkfs, mount.

Thin async wrappers over loop ioctls (:mod:`edgevisor.storage.loopctl`; ``losetup`` as the
fallback), ``blkid``, ``mkfs``, ``mount``/``umount`` and
``/proc/self/mountinfo``, each idempotent (it asks the kernel what exists first), with
their failures turned into :class:`AttachError`. :mod:`edgevisor.storage.attach` composes
them into one attachment; the mount step can run in another mount namespace
(``mount_ns=/proc/PID/ns/mnt``, through ``nsenter``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from edgevisor.errors import Conflict, UnavailableError
from edgevisor.storage import loopctl

__all__ = [
    "AttachError",
    "AttachSettings",
    "FilesystemMismatch",
    "LoopEntry",
    "MountEntry",
    "detach_loop",
    "ensure_filesystem",
    "is_mounted",
    "list_loop_devices",
    "loop_backing_file",
    "mount_at",
    "mount_filesystem",
    "parse_losetup_json",
    "parse_mountinfo",
    "read_mountinfo",
    "run_tool",
    "setup_loop",
    "unmount_filesystem",
]

log = logging.getLogger(__name__)


class AttachError(UnavailableError):
    """A host tool (losetup, mkfs, mount, fusermount3) or the FUSE process failed."""

    code = "attach_failed"


class FilesystemMismatch(Conflict):
    """The image holds a different filesystem than asked for; it is never reformatted."""

    code = "filesystem_mismatch"


class AttachSettings(BaseModel):
    """How volumes are exposed to domains (``storage.attach`` section)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    fstype: str = Field("ext4", description="Filesystem created on first use and mounted.")
    mkfs_options: tuple[str, ...] = Field(
        ("-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0"),
        description=(
            "Extra mkfs options. The image has no discard, and lazy init would keep writing "
            "through FUSE long after the mount."
        ),
    )
    mount_options: tuple[str, ...] = Field(
        (), description="Options for the filesystem mount (`-o` items)."
    )
    fuse_direct_io: bool = Field(
        True,
        description=(
            "Open the image with FOPEN_DIRECT_IO: no second page cache under the filesystem's "
            "own, and requests as big as the caller's (up to 1 MiB) instead of 128 KiB."
        ),
    )
    fuse_readahead_kb: int = Field(
        1024,
        ge=0,
        description="Readahead of the FUSE mount (matters without direct I/O; 0: kernel default).",
    )
    loop_readahead_kb: int = Field(
        1024, ge=0, description="Readahead of the loop device (0: leave the kernel default)."
    )
    loop_ioctl: bool = Field(
        True,
        description=(
            "Attach and detach loop devices by ioctl (~1 ms) instead of running losetup "
            "(~50 ms); losetup stays the fallback where the ioctls are missing."
        ),
    )
    loop_direct_io: bool = Field(
        False, description="Attach the loop device with direct I/O on the image."
    )
    fuse_spare: bool = Field(
        True,
        description=(
            "Keep one FUSE process started ahead (interpreter and imports done), so an "
            "attach skips ~300 ms of process start."
        ),
    )
    fuse_spare_refill_delay_s: float = Field(
        1.0,
        ge=0,
        description=(
            "Wait after a spare was taken before starting the next one, leaving the CPU to "
            "the attach (and the domain start) that took it."
        ),
    )
    mount_syscall: bool = Field(
        True,
        description=(
            "Mount the filesystem with mount(2) when no other mount namespace is involved "
            "(~1 ms instead of ~35 ms for mount(8)); mount(8) stays the fallback."
        ),
    )
    fuse_start_timeout_s: float = Field(
        30.0, gt=0, description="Longest wait for the FUSE process to mount."
    )
    stop_timeout_s: float = Field(
        30.0, gt=0, description="Longest wait for a busy loop device or FUSE mount to let go."
    )
    command_timeout_s: float = Field(
        120.0, gt=0, description="Longest run of one host tool (mkfs of a big image)."
    )
    probe_timeout_s: float = Field(
        5.0, gt=0, description="A FUSE mount that does not answer stat in this time is hung."
    )


# -- kernel state: mounts and loop devices --------------------------------------------------


@dataclass(frozen=True)
class MountEntry:
    mount_id: int
    dev: str  # "major:minor"
    mount_point: str
    fstype: str
    source: str


_OCTAL = re.compile(r"\\([0-7]{3})")


def _unescape(field_: str) -> str:
    """Undo mountinfo's octal escapes (space, tab, newline, backslash)."""
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field_)


def parse_mountinfo(text: str) -> list[MountEntry]:
    """Parse ``/proc/PID/mountinfo`` (see proc(5)); lines in mount order."""
    out: list[MountEntry] = []
    for line in text.splitlines():
        fields = line.split(" ")
        try:
            sep = fields.index("-", 6)
            out.append(
                MountEntry(
                    mount_id=int(fields[0]),
                    dev=fields[2],
                    mount_point=_unescape(fields[4]),
                    fstype=fields[sep + 1],
                    source=_unescape(fields[sep + 2]),
                )
            )
        except (ValueError, IndexError):
            continue
    return out


def read_mountinfo(pid: int | str = "self") -> list[MountEntry]:
    with open(f"/proc/{pid}/mountinfo", encoding="utf-8", errors="surrogateescape") as fh:
        return parse_mountinfo(fh.read())


@dataclass(frozen=True)
class LoopEntry:
    device: str  # /dev/loopN
    dev: str  # "7:N"
    backing_file: str
    backing_dev: str  # "major:minor" of the filesystem holding the backing file


def parse_losetup_json(text: str) -> list[LoopEntry]:
    if not text.strip():
        return []
    data = json.loads(text)
    out = []
    for item in data.get("loopdevices", []):
        back = item.get("back-file") or ""
        # losetup marks a backing file that was unlinked or whose path is gone
        back = back.removesuffix(" (deleted)")
        out.append(
            LoopEntry(
                device=str(item["name"]).strip(),
                dev=str(item.get("maj:min") or "").strip(),  # losetup pads these
                backing_file=back,
                backing_dev=str(item.get("back-maj:min") or "").strip(),
            )
        )
    return out


async def list_loop_devices(*, timeout_s: float = 30.0) -> list[LoopEntry]:
    rc, out, err = await run_tool(
        ["losetup", "--json", "--list", "-O", "NAME,MAJ:MIN,BACK-FILE,BACK-MAJ:MIN"],
        timeout_s=timeout_s,
        check=False,
    )
    if rc != 0:
        raise AttachError(f"losetup --list failed: {err.strip()}")
    return parse_losetup_json(out)


# -- running host tools -------------------------------------------------------------------


async def run_tool(
    argv: list[str], *, timeout_s: float, check: bool = True, input_: bytes | None = None
) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=subprocess.PIPE if input_ is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(input_), timeout_s)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise AttachError(
            f"{argv[0]} did not finish in {timeout_s} s", details={"argv": argv}
        ) from None
    rc = proc.returncode if proc.returncode is not None else -1
    text_out, text_err = out.decode(errors="replace"), err.decode(errors="replace")
    if check and rc != 0:
        raise AttachError(
            f"{' '.join(argv)} failed ({rc}): {text_err.strip()}",
            details={"argv": argv, "returncode": rc, "stderr": text_err},
        )
    return rc, text_out, text_err


def _in_ns(argv: list[str], mount_ns: Path | None) -> list[str]:
    return argv if mount_ns is None else ["nsenter", f"--mount={mount_ns}", "--", *argv]


def is_mounted(target: str, mounts: list[MountEntry] | None = None) -> bool:
    return any(m.mount_point == target for m in (mounts or read_mountinfo()))


def mount_at(target: str) -> MountEntry | None:
    found = [m for m in read_mountinfo() if m.mount_point == target]
    return found[-1] if found else None


# -- loop device --------------------------------------------------------------------------


async def setup_loop(image: Path, *, settings: AttachSettings) -> str:
    """Attach ``image`` to a loop device (reusing one already on it) and return its path."""
    if settings.loop_ioctl:
        # In a thread, never on the event loop: LOOP_CONFIGURE fsyncs the backing file,
        # and a FUSE image may need this very process (an NBD export it serves) to answer.
        device = await asyncio.to_thread(loopctl.find_loop, str(image))
        if device is None:
            try:
                device = await asyncio.to_thread(
                    loopctl.attach_loop, str(image), direct_io=settings.loop_direct_io
                )
            except loopctl.LoopUnsupported as exc:
                log.info("loop ioctls unavailable (%s); using losetup", exc)
            except OSError as exc:
                raise AttachError(f"cannot attach {image} to a loop device: {exc}") from exc
    else:
        device = await _setup_loop_tool(image, settings=settings)
    if device is None:
        device = await _setup_loop_tool(image, settings=settings)
    if settings.loop_readahead_kb > 0:
        # The filesystem on top reads ahead by its device's setting (128 KiB by default);
        # every request it sends becomes one FUSE request, so bigger is faster.
        ra = Path(f"/sys/block/{os.path.basename(device)}/queue/read_ahead_kb")
        try:
            ra.write_text(str(settings.loop_readahead_kb))
        except OSError as exc:
            log.info("cannot set readahead of %s: %s", device, exc)
    return device


async def _setup_loop_tool(image: Path, *, settings: AttachSettings) -> str:
    st = os.stat(image)
    want_dev = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    for entry in await list_loop_devices(timeout_s=settings.command_timeout_s):
        if entry.backing_file == str(image) and entry.backing_dev == want_dev:
            return entry.device
    argv = ["losetup", "--find", "--show"]
    if settings.loop_direct_io:
        argv.append("--direct-io=on")
    _, out, _ = await run_tool([*argv, str(image)], timeout_s=settings.command_timeout_s)
    device = out.strip()
    if not device.startswith("/dev/loop"):
        raise AttachError(f"losetup printed no device for {image}: {out!r}")
    return device


async def detach_loop(device: str, *, settings: AttachSettings) -> None:
    """Detach a loop device and wait until the kernel has let it go; idempotent."""
    done = False
    if settings.loop_ioctl:
        try:
            await asyncio.to_thread(loopctl.clear_loop, device)  # may flush: see setup_loop
            done = True
        except OSError as exc:
            log.info("LOOP_CLR_FD on %s failed (%s); using losetup", device, exc)
    if not done:
        rc, _, err = await run_tool(
            ["losetup", "--detach", device], timeout_s=settings.command_timeout_s, check=False
        )
        if rc != 0 and loop_backing_file(device) is not None:
            raise AttachError(f"losetup --detach {device} failed: {err.strip()}")
    deadline = time.monotonic() + settings.stop_timeout_s
    while loop_backing_file(device) is not None:
        if time.monotonic() > deadline:
            # autoclear is set: it goes once the last opener (a lazy mount) lets go
            log.warning("loop device %s is still in use; it is set to autoclear", device)
            return
        await asyncio.sleep(0.05)


def loop_backing_file(device: str) -> str | None:
    name = os.path.basename(device)
    try:
        return Path(f"/sys/block/{name}/loop/backing_file").read_text().strip()
    except OSError:
        return None


# -- filesystem ---------------------------------------------------------------------------


async def ensure_filesystem(device: str, *, settings: AttachSettings) -> bool:
    """Create the filesystem unless one is there; True when it was created.

    Anything else found on the device (another filesystem, a partition table) is left
    untouched and reported as :class:`FilesystemMismatch`.
    """
    if settings.fstype == "ext4" and await asyncio.to_thread(_has_ext4_superblock, device):
        return False  # plainly ext4: no blkid process (~12 ms) on the attach path
    rc, out, err = await run_tool(
        ["blkid", "-p", "-o", "value", "-s", "TYPE", device],
        timeout_s=settings.command_timeout_s,
        check=False,
    )
    if rc == 0:
        found = out.strip()
        if found == settings.fstype:
            return False
        raise FilesystemMismatch(
            f"{device} holds {found or 'an unknown signature'}, not {settings.fstype}",
            details={"device": device, "found": found},
        )
    if rc != 2:  # 2: nothing found; anything else is blkid failing
        raise AttachError(f"blkid {device} failed ({rc}): {err.strip()}")
    await run_tool(
        [f"mkfs.{settings.fstype}", "-q", "-F", *settings.mkfs_options, device],
        timeout_s=settings.command_timeout_s,
    )
    return True


_EXT_SUPERBLOCK_OFFSET = 1024
_EXT_MAGIC = 0xEF53
_EXT4_INCOMPAT_EXTENTS = 0x40


def _has_ext4_superblock(device: str) -> bool:
    """True when ``device`` starts with an ext superblock that uses extents (so: ext4).

    Anything else (no magic, ext2/3 without extents, a read error) says "ask blkid".
    """
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        sb = os.pread(fd, 1024, _EXT_SUPERBLOCK_OFFSET)
    except OSError:
        return False
    finally:
        os.close(fd)
    if len(sb) < 0x64:
        return False
    magic = int.from_bytes(sb[0x38:0x3A], "little")
    incompat = int.from_bytes(sb[0x60:0x64], "little")
    return magic == _EXT_MAGIC and bool(incompat & _EXT4_INCOMPAT_EXTENTS)


async def mount_filesystem(
    device: str,
    target: Path,
    *,
    settings: AttachSettings,
    mount_ns: Path | None = None,
) -> None:
    """Mount ``device`` on ``target`` (in ``mount_ns`` if given); idempotent."""
    tgt = os.path.abspath(target)
    if mount_ns is None:
        target.mkdir(parents=True, exist_ok=True)
        current = mount_at(tgt)
        if current is not None and os.path.realpath(current.source) == os.path.realpath(device):
            return
    else:
        await run_tool(_in_ns(["mkdir", "-p", tgt], mount_ns), timeout_s=settings.command_timeout_s)
        rc, out, _ = await run_tool(
            _in_ns(["findmnt", "-n", "-o", "SOURCE", "--mountpoint", tgt], mount_ns),
            timeout_s=settings.command_timeout_s,
            check=False,
        )
        if rc == 0 and device in out.split():
            return
    # in a thread: the mount reads the superblock through the FUSE image (see setup_loop)
    if mount_ns is None and await asyncio.to_thread(_mount_syscall, device, tgt, settings):
        return
    argv = ["mount", "-t", settings.fstype]
    if settings.mount_options:
        argv += ["-o", ",".join(settings.mount_options)]
    await run_tool(_in_ns([*argv, device, tgt], mount_ns), timeout_s=settings.command_timeout_s)


# mount(8) turns these options into mount(2) flags; everything else is filesystem data
_MS_FLAGS = {
    "ro": 1,  # MS_RDONLY
    "nosuid": 2,
    "nodev": 4,
    "noexec": 8,
    "sync": 16,
    "dirsync": 128,
    "noatime": 1024,
    "nodiratime": 2048,
    "relatime": 1 << 21,
    "strictatime": 1 << 24,
    "lazytime": 1 << 25,
}
_MOUNT_NEUTRAL = {"rw", "defaults", "suid", "dev", "exec", "async", "atime", "diratime"}


def _mount_syscall(device: str, target: str, settings: AttachSettings) -> bool:
    """mount(2) in this namespace (~1 ms, no mount(8) process); False: use the tool.

    Any failure falls back to the tool, which then reports it in mount(8)'s words.
    """
    if not settings.mount_syscall:
        return False
    flags = 0
    data: list[str] = []
    for opt in settings.mount_options:
        if opt in _MS_FLAGS:
            flags |= _MS_FLAGS[opt]
        elif opt not in _MOUNT_NEUTRAL:
            data.append(opt)
    libc = ctypes.CDLL(None, use_errno=True)
    rc = libc.mount(
        os.fsencode(device),
        os.fsencode(target),
        settings.fstype.encode(),
        ctypes.c_ulong(flags),
        ",".join(data).encode() if data else None,
    )
    if rc != 0:
        err = ctypes.get_errno()
        log.info("mount(2) of %s on %s failed (%s); using mount", device, target, os.strerror(err))
        return False
    return True


async def unmount_filesystem(
    target: Path,
    *,
    settings: AttachSettings,
    mount_ns: Path | None = None,
    lazy: bool = False,
) -> None:
    """Unmount ``target``; idempotent. ``lazy`` detaches it even while it is busy."""
    tgt = os.path.abspath(target)
    argv = ["umount", "-l", tgt] if lazy else ["umount", tgt]
    rc, _, err = await run_tool(
        _in_ns(argv, mount_ns), timeout_s=settings.command_timeout_s, check=False
    )
    if rc == 0 or "not mounted" in err or "no mount point" in err:
        return
    if mount_ns is None and not is_mounted(tgt):
        return
    raise AttachError(f"umount {tgt} failed: {err.strip()}", details={"stderr": err})

"""The FUSE process exposing a block device as an image file (for :mod:`.attach`).

Started fresh (``python -m edgevisor.storage.fuse_image``) or handed its arguments as a
pre-started :class:`~edgevisor.storage.fuse_spare.SpareFuse`; probed by statfs (every
statfs is a request to the process, so a dead or hung one shows); stopped by unmounting
its mount (a pyfuse3 daemon ends then, not on SIGINT), killed only when it will not go.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from edgevisor.storage.fuse_spare import SpareFuse
from edgevisor.storage.hostfs import AttachError, AttachSettings, is_mounted, run_tool

__all__ = ["lazy_unmount_fuse", "pid_alive", "probe_fuse_mount", "reap", "start_fuse", "stop_fuse"]

log = logging.getLogger("edgevisor.storage.attach")

_READY = b"ready\n"


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def reap(pid: int) -> None:
    """Collect our own child's exit status so it does not linger as a zombie."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


async def probe_fuse_mount(mount_point: Path, *, timeout_s: float = 5.0) -> str:
    """``"live"``, ``"dead"`` (ENOTCONN: the process is gone) or ``"hung"`` (no answer).

    statfs, not stat: the kernel answers stat from cached attributes even after the
    connection is gone, while every statfs is a request to the FUSE process.
    """
    try:
        await asyncio.wait_for(asyncio.to_thread(os.statvfs, mount_point), timeout_s)
    except TimeoutError:
        return "hung"  # the thread stays blocked until the mount is cleared or answers
    except OSError as exc:
        return "dead" if exc.errno in (errno.ENOTCONN, errno.ECONNABORTED) else "live"
    return "live"


async def start_fuse(
    mount_point: Path,
    *,
    kind: str,
    arg: str,
    log_path: Path,
    settings: AttachSettings,
    fsname: str = "edgevisor",
    spares: SpareFuse | None = None,
) -> int:
    """Start the FUSE process on ``mount_point`` and return its pid once it is mounted.

    With ``spares`` (and ``settings.fuse_spare``) a waiting spare process gets the
    arguments instead of a fresh interpreter being started, and the pool refills later.
    """
    mount_point.mkdir(parents=True, exist_ok=True)
    fuse_args = [
        str(mount_point),
        "--kind",
        kind,
        "--arg",
        arg,
        "--readahead-kb",
        str(settings.fuse_readahead_kb),
        "--fsname",
        fsname,
    ]
    if settings.fuse_direct_io:
        fuse_args.append("--direct-io")
    spare = spares.take() if spares is not None and settings.fuse_spare else None
    if spare is not None and not spare.hand_over(fuse_args, log_path):
        log.info("spare FUSE process %d is gone; starting a fresh one", spare.pid)
        spare.discard()
        spare = None
    if spare is not None:
        proc, rfd = spare.proc, spare.ready_fd
    else:
        proc, rfd = _spawn_fuse(fuse_args, log_path)
    try:
        ready = await _wait_ready(rfd, settings.fuse_start_timeout_s)
    finally:
        os.close(rfd)
    if spares is not None and settings.fuse_spare:
        spares.schedule_refill()
    if not ready:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        tail = _tail(log_path)
        raise AttachError(
            f"FUSE process for {mount_point} did not come up: {tail}",
            details={"log": str(log_path)},
        )
    return proc.pid


def _spawn_fuse(fuse_args: list[str], log_path: Path) -> tuple[subprocess.Popen[bytes], int]:
    """A fresh FUSE process; returns it and the read end of its ready pipe."""
    rfd, wfd = os.pipe()
    argv = [sys.executable, "-m", "edgevisor.storage.fuse_image", *fuse_args]
    try:
        with open(log_path, "ab") as logf:
            # Own session: a signal to the agent's process group must not take the
            # filesystem (and every domain on it) down with it.
            proc = subprocess.Popen(
                [*argv, "--ready-fd", str(wfd)],
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=logf,
                pass_fds=(wfd,),
                start_new_session=True,
            )
    except BaseException:
        os.close(rfd)
        raise
    finally:
        os.close(wfd)
    return proc, rfd


async def _wait_ready(fd: int, timeout_s: float) -> bool:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[bytes] = loop.create_future()

    def _readable() -> None:
        if not fut.done():
            try:
                fut.set_result(os.read(fd, 64))
            except OSError as exc:
                fut.set_exception(exc)

    loop.add_reader(fd, _readable)
    try:
        data = await asyncio.wait_for(fut, timeout_s)
    except (TimeoutError, OSError):
        return False
    finally:
        loop.remove_reader(fd)
    return data.startswith(_READY)


def _tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_bytes()[-n:].decode(errors="replace").strip()
    except OSError:
        return "(no log)"


async def stop_fuse(mount_point: Path, pid: int | None, *, settings: AttachSettings) -> None:
    """Unmount the FUSE image and wait for its process to end; idempotent.

    ``fusermount3 -u`` fails with EBUSY for a short while after a loop device was detached
    (the kernel drops its file reference asynchronously), so it is retried until
    ``stop_timeout_s``; then the process is killed and the mount lazily removed.
    """
    deadline = time.monotonic() + settings.stop_timeout_s
    target = os.path.abspath(mount_point)
    while is_mounted(target):
        rc, _, err = await run_tool(
            ["fusermount3", "-u", target], timeout_s=settings.command_timeout_s, check=False
        )
        if rc == 0 or not is_mounted(target):
            break
        if time.monotonic() > deadline:
            log.warning("FUSE mount %s stays busy (%s); clearing it lazily", target, err.strip())
            await lazy_unmount_fuse(target, settings)
            break
        await asyncio.sleep(0.02)  # the kernel lets go within tens of ms after a loop detach
    if pid is None:
        return
    while pid_alive(pid):
        reap(pid)
        if not pid_alive(pid):
            break
        if time.monotonic() > deadline:
            log.warning("FUSE process %d did not exit; killing it", pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + settings.stop_timeout_s
        await asyncio.sleep(0.05)
    reap(pid)


async def lazy_unmount_fuse(target: str, settings: AttachSettings) -> None:
    rc, _, _ = await run_tool(
        ["fusermount3", "-uz", target], timeout_s=settings.command_timeout_s, check=False
    )
    if rc != 0 and is_mounted(target):
        await run_tool(["umount", "-l", target], timeout_s=settings.command_timeout_s)

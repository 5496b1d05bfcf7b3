"""A pre-started FUSE process, so attaching a volume skips interpreter start and imports.

Starting ``python -m edgevisor.storage.fuse_image`` costs ~300 ms, nearly all of it the
interpreter and its imports (pyfuse3, trio, the device modules), none of which depends on
the volume. :class:`SpareFuse` keeps one process started ahead with ``--spare``: it imports
everything and then blocks reading one JSON line (its real arguments) on stdin.
:func:`edgevisor.storage.attach.start_fuse` takes the spare, writes the arguments and waits
for ``ready`` on the spare's ready pipe, exactly as for a fresh process; the pool then
starts the next spare after a short delay (not at once: the attach that just took the spare
still needs the CPU for losetup, mkfs and mount).

Theory of operation (one spare slot)::

    empty --spawn--> spare --take--> empty (the taken process now serves a mount)
      ^                |  \\--spare died--> empty
      +----refill------+   close: SIGKILL the spare, no more refills

A spare runs in its own session (as every FUSE process does) and carries
``PR_SET_PDEATHSIG(SIGKILL)`` while it waits: if the agent dies, its spare dies with it.
It clears that signal once it has its arguments, because a FUSE process serving a mount
must outlive an agent restart. PDEATHSIG fires when the *thread* that forked the spare
ends, so spawn only from the event loop thread (which is what :meth:`SpareFuse.start` and
the refill timer do). A spare that never got arguments holds no ``/dev/fuse`` descriptor,
which is how :func:`edgevisor.storage.attach._is_fuse_image_process` tells it from a mount.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from edgevisor.storage.hostfs import AttachSettings

__all__ = ["SpareFuse", "SpareProcess", "holds_dev_fuse"]

log = logging.getLogger(__name__)

_MODULE = "edgevisor.storage.fuse_image"


@dataclass
class SpareProcess:
    """One spare taken from the pool: write its arguments with :meth:`hand_over`."""

    proc: subprocess.Popen[bytes]
    ctl_fd: int  # write end of the spare's stdin
    ready_fd: int  # read end of the pipe the spare writes ``ready`` to

    @property
    def pid(self) -> int:
        return self.proc.pid

    def hand_over(self, fuse_argv: Sequence[str], log_path: Path) -> bool:
        """Send the real arguments (without ``--ready-fd``); False if the spare is gone.

        Closes the control pipe either way; on False the caller still owns ``ready_fd``
        and the process (see :meth:`discard`).
        """
        line = json.dumps({"argv": list(fuse_argv), "log_path": str(log_path)}) + "\n"
        try:
            # far below PIPE_BUF on an empty pipe: one write, never partial, never blocks
            os.write(self.ctl_fd, line.encode())
        except OSError:
            return False
        finally:
            os.close(self.ctl_fd)
            self.ctl_fd = -1
        return True

    def discard(self) -> None:
        """Kill the process and close what is still open (a failed hand-over)."""
        for fd in (self.ctl_fd, self.ready_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.ctl_fd = self.ready_fd = -1
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class SpareFuse:
    """Owns at most one spare FUSE process; :meth:`close` kills it.

    ``preload`` names device kinds (as ``--kind`` takes them) whose modules the spare
    imports ahead, in addition to the built-in kinds. ``spawned`` counts interpreters
    started by the pool and ``taken`` the spares handed out (for tests and metrics).
    """

    def __init__(
        self,
        *,
        settings: AttachSettings | None = None,
        preload: Sequence[str] = (),
        python: str | None = None,
    ) -> None:
        self.settings = settings or AttachSettings()
        self.preload = tuple(preload)
        self.python = python or sys.executable
        self.spawned = 0
        self.taken = 0
        self._spare: SpareProcess | None = None
        self._refill: asyncio.TimerHandle | None = None
        self._closed = False

    @property
    def pid(self) -> int | None:
        """The waiting spare's pid, if there is one."""
        return self._spare.pid if self._spare is not None else None

    @property
    def closed(self) -> bool:
        return self._closed

    def start(self) -> None:
        """Make sure a spare is waiting (spawns one now if not); call from the loop thread."""
        if self._closed:
            return
        if self._spare is not None and self._spare.proc.poll() is None:
            return
        if self._spare is not None:
            self._spare.discard()
            self._spare = None
        try:
            self._spare = self._spawn()
        except OSError as exc:
            log.warning("cannot start a spare FUSE process: %s", exc)

    def take(self) -> SpareProcess | None:
        """The waiting spare, removed from the pool; None if there is none alive."""
        spare, self._spare = self._spare, None
        if spare is None:
            return None
        if spare.proc.poll() is not None:
            log.info("spare FUSE process %d had exited (%s)", spare.pid, spare.proc.returncode)
            spare.discard()
            return None
        self.taken += 1
        return spare

    def schedule_refill(self, delay_s: float | None = None) -> None:
        """Start the next spare after ``delay_s`` (default: the setting), on the loop thread."""
        if self._closed or self._refill is not None:
            return
        delay = self.settings.fuse_spare_refill_delay_s if delay_s is None else delay_s
        loop = asyncio.get_running_loop()

        def _fire() -> None:
            self._refill = None
            self.start()

        self._refill = loop.call_later(delay, _fire)

    def close(self) -> None:
        """Kill the waiting spare and stop refilling; idempotent. Mounts are not touched."""
        self._closed = True
        if self._refill is not None:
            self._refill.cancel()
            self._refill = None
        spare, self._spare = self._spare, None
        if spare is not None:
            spare.discard()

    def _spawn(self) -> SpareProcess:
        ctl_r, ctl_w = os.pipe()
        ready_r, ready_w = os.pipe()
        argv = [
            self.python,
            "-m",
            _MODULE,
            "--spare",
            "--ready-fd",
            str(ready_w),
            "--parent-pid",
            str(os.getpid()),
        ]
        for kind in self.preload:
            argv += ["--preload", kind]
        try:
            proc = subprocess.Popen(
                argv,
                stdin=ctl_r,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                pass_fds=(ready_w,),
                start_new_session=True,
            )
        except BaseException:
            for fd in (ctl_w, ready_r):
                os.close(fd)
            raise
        finally:
            os.close(ctl_r)
            os.close(ready_w)
        os.set_blocking(ready_r, False)
        self.spawned += 1
        log.debug("started spare FUSE process %d", proc.pid)
        return SpareProcess(proc=proc, ctl_fd=ctl_w, ready_fd=ready_r)


def holds_dev_fuse(pid: int) -> bool:
    """True when process ``pid`` has ``/dev/fuse`` open (it serves, or served, a mount)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/fuse":
                return True
    return False

"""Event-loop I/O of a process environment: non-blocking pipe fds and the call timer.

The runtime's pipes are read and written without blocking the loop (``add_reader`` /
``add_writer`` waits, no thread per environment); :class:`_CallTimer` keeps one armed
timer handle per environment instead of one per call. Used by :mod:`.sandbox_process`
and :mod:`.isolation`.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

__all__ = ["bwrap_child_pid", "read_to_eof", "wait_readable"]


def _set_nonblocking(fd: int) -> None:
    os.set_blocking(fd, False)


async def wait_readable(fd: int) -> None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    loop.add_reader(fd, ready)
    try:
        await fut
    finally:
        loop.remove_reader(fd)


async def _wait_writable(fd: int) -> None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    loop.add_writer(fd, ready)
    try:
        await fut
    finally:
        loop.remove_writer(fd)


async def read_to_eof(fd: int, limit: int = 1 << 16) -> bytes:
    """Read a non-blocking fd until EOF (or ``limit`` bytes) without blocking the loop."""
    data = b""
    while len(data) < limit:
        try:
            chunk = os.read(fd, limit)
        except BlockingIOError:
            await wait_readable(fd)
            continue
        if not chunk:
            break
        data += chunk
    return data



async def bwrap_child_pid(info_fd: int) -> int | None:
    """The host pid of bwrap's sandboxed child, from what bwrap writes to its
    ``--info-fd`` (read to EOF without blocking the loop); None when it wrote none (it
    failed to start)."""
    os.set_blocking(info_fd, False)
    try:
        pid = json.loads(await read_to_eof(info_fd)).get("child-pid")
    except (ValueError, AttributeError):
        return None
    return pid if isinstance(pid, int) and pid > 0 else None

class _CallTimer:
    """The timeout of an environment's call in progress, without a timer per call.

    ``asyncio.timeout`` arms and cancels a timer handle per call (plus its bookkeeping),
    a visible cost at thousands of warm calls a second. Here one handle stays armed while
    calls come and go: a call only sets its deadline; when the handle fires it compares
    the time with the deadline of the call then in progress, re-arms for a later one,
    disarms when no call runs, and cancels the calling task when the deadline has passed
    (``fired`` then tells the caller that the cancellation was a timeout).
    """

    __slots__ = ("_deadline", "_handle", "_task", "fired")

    def __init__(self) -> None:
        self._deadline = 0.0
        self._handle: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[Any] | None = None
        self.fired = False

    def start(self, task: asyncio.Task[Any], timeout_s: float) -> None:
        loop = asyncio.get_running_loop()
        self._deadline = loop.time() + timeout_s
        self._task = task
        self.fired = False
        if self._handle is None or self._handle.when() > self._deadline:
            if self._handle is not None:
                self._handle.cancel()
            self._handle = loop.call_at(self._deadline, self._check)

    def stop(self) -> None:
        self._task = None  # the armed handle finds no call and disarms

    def close(self) -> None:
        self._task = None
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _check(self) -> None:
        self._handle = None
        task = self._task
        if task is None:
            return
        loop = asyncio.get_running_loop()
        if loop.time() < self._deadline:
            self._handle = loop.call_at(self._deadline, self._check)
            return
        self._task = None
        self.fired = True
        task.cancel()

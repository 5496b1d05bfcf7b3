"""Helpers for device integration tests: free ports, polling, and the real mosquitto
command-line clients acting as devices (a uniquely named module, not ``conftest``, so other
areas' conftest files cannot shadow it)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_for(cond: Callable[[], bool], timeout_s: float = 30.0) -> None:
    """Poll ``cond`` until true; generous deadline, no tight timing."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


@dataclass
class Sub:
    """A running ``mosquitto_sub``; ``codes`` are the SUBACK return codes."""

    proc: asyncio.subprocess.Process
    codes: list[int] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)

    async def _pump(self) -> None:
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            line = raw.decode().rstrip("\n")
            if not line.startswith("Client ") and not line.startswith("Subscribed"):
                self.lines.append(line)

    async def messages(self, n: int, timeout_s: float = 30.0) -> list[tuple[str, str]]:
        await wait_for(lambda: len(self.lines) >= n, timeout_s)
        return [tuple(line.split(" ", 1)) for line in self.lines[:n]]  # type: ignore[misc]


async def pub(port: int, user: str | None, password: str | None, topic: str, message: str
              ) -> tuple[int, str]:
    args = ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-t", topic, "-m", message]
    if user is not None:
        args += ["-u", user]
    if password is not None:
        args += ["-P", password]
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, err.decode()


@contextlib.asynccontextmanager
async def sub(port: int, user: str, password: str, *topics: str) -> AsyncIterator[Sub]:
    # stdbuf: mosquitto_sub block-buffers stdout into a pipe; we need each line now.
    args = ["stdbuf", "-oL", "mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-d", "-v"]
    args += ["-u", user, "-P", password]
    for t in topics:
        args += ["-t", t]
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    s = Sub(proc)
    assert proc.stdout is not None
    try:
        # Wait for the SUBACK so nothing published afterwards can be missed.
        while True:
            raw = await asyncio.wait_for(proc.stdout.readline(), 30)
            if not raw:
                raise AssertionError("mosquitto_sub exited before SUBACK")
            line = raw.decode()
            if line.startswith("Subscribed"):
                s.codes = [int(c) for c in line.split("):", 1)[1].split(",")]
                break
        pump = asyncio.create_task(s._pump())
        try:
            yield s
        finally:
            pump.cancel()
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()

"""A quiesce resets the connections its domain held (as root): a client in the middle of
a request at the freeze learns at once that the source is gone, instead of waiting out
its own timeout (on the bench's prober: a 500 ms blind spot across the switch).

The veth is retired only after every task of the domain exited, so the resets their
sockets' close sends still reach the clients over it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import AsyncIterator

import pytest
from domain_env import PY, Env, domain_env

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]

# accepts and keeps every connection, never answers
HOLD = """
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8080))
s.listen(16)
held = []
while True:
    held.append(s.accept()[0])
"""


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    async with domain_env("evtest-resets", "r", 2000 + os.getpid() % 900) as e:
        yield e


def _connect(addr: str, deadline_s: float = 60.0) -> socket.socket:
    end = time.monotonic() + deadline_s
    while True:
        try:
            return socket.create_connection((addr, 8080), timeout=2)
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.1)


def _wait_end(s: socket.socket) -> str:
    """How the connection ended: 'reset', 'eof' or 'timeout' (nothing for 15 s)."""
    s.settimeout(15)
    try:
        return "eof" if s.recv(64) == b"" else "data"
    except ConnectionResetError:
        return "reset"
    except TimeoutError:
        return "timeout"


async def test_quiesce_resets_connections_held_by_the_domain(env: Env) -> None:
    d = env.domain("hold", [PY, "-I", "-S", "-c", HOLD])
    await d.start()
    clients = [await asyncio.to_thread(_connect, str(d.address)) for _ in range(3)]
    try:
        for c in clients:
            c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # never answered
        await asyncio.sleep(0.2)  # every connection accepted
        ends = asyncio.gather(*(asyncio.to_thread(_wait_end, c) for c in clients))
        t0 = time.monotonic()
        await d.quiesce()
        got = await ends
        took = time.monotonic() - t0
    finally:
        for c in clients:
            with contextlib.suppress(OSError):
                c.close()
    assert set(got) <= {"reset", "eof"}, got
    assert took < 10, took  # generous: the point is "not the client's own timeout"
    await d.wait_torn_down()
    assert d.ifname is None or not os.path.exists(f"/sys/class/net/{d.ifname}")

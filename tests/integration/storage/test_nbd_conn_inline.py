"""Server sessions answer small reads inline (issue 5: 4 KiB QD1 read latency).

A READ the device can serve from its file is answered inside the readable callback, with
no task, no thread hop and no wait for another loop iteration; larger reads go out with
``sendfile`` and devices without a file take the task path. Every path returns the bytes
of the file, with structured and with simple replies.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgevisor.proto.nbd import ClientConnection
from edgevisor.proto.nbd_wire import Cmd, Command, Negotiated, Reply
from edgevisor.storage.nbd_conn import Conn
from edgevisor.storage.nbd_server import Export, NBDServer
from edgevisor.storage.volume import Volume

SIZE = 4 << 20


class _NoFileDevice:
    """A volume seen through a device without the ``file_extent`` fast path."""

    def __init__(self, vol: Volume) -> None:
        self._vol = vol
        self.size_bytes = vol.size_bytes

    async def read(self, offset: int, length: int) -> bytes:
        await asyncio.sleep(0)  # a device that really waits
        return await self._vol.read(offset, length)


@dataclass
class Session:
    conn: Conn
    client: ClientConnection
    sock: socket.socket

    def send(self, cmd: Command) -> None:
        self.sock.sendall(self.client.send(cmd))

    def replies_now(self) -> list[Reply]:
        """Replies already on the wire, without giving the event loop a turn."""
        out: list[Reply] = []
        while True:
            try:
                data = self.sock.recv(1 << 20, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return out
            self.client.receive_data(data)
            while (ev := self.client.next_event()) is not None:
                assert isinstance(ev, Reply)
                out.append(ev)

    async def replies(self, n: int) -> list[Reply]:
        out: list[Reply] = []
        for _ in range(2000):
            out += self.replies_now()
            if len(out) >= n:
                return out
            await asyncio.sleep(0.005)
        raise AssertionError(f"only {len(out)} of {n} replies arrived")


@pytest.fixture
async def volume(tmp_path: Path) -> AsyncIterator[Volume]:
    vol = Volume.create(tmp_path / "vol", SIZE)
    with open(vol.data_path, "r+b") as f:
        f.write(os.urandom(SIZE))
    try:
        yield vol
    finally:
        vol.close()


async def _session(server: NBDServer, export: str, structured: bool) -> Session:
    ours, theirs = socket.socketpair()
    conn = Conn(server, ours)
    conn.start()
    client = ClientConnection(export, structured=structured)
    theirs.setblocking(False)
    for _ in range(2000):
        if out := client.data_to_send():
            theirs.sendall(out)
        try:
            client.receive_data(theirs.recv(65536))
        except BlockingIOError:
            await asyncio.sleep(0.002)
            continue
        while (ev := client.next_event()) is not None:
            if isinstance(ev, Negotiated):
                return Session(conn, client, theirs)
    raise AssertionError("handshake did not finish")


@pytest.fixture
async def server(volume: Volume) -> AsyncIterator[NBDServer]:
    srv = NBDServer()
    srv.main_loop = asyncio.get_running_loop()
    srv.add_export(Export("vol", volume))
    srv.add_export(Export("nofile", _NoFileDevice(volume)))  # type: ignore[arg-type]
    try:
        yield srv
    finally:
        await srv.aclose()


@pytest.mark.parametrize("structured", [True, False])
async def test_issue5_small_read_is_answered_inline(
    server: NBDServer, volume: Volume, structured: bool
) -> None:
    s = await _session(server, "vol", structured)
    try:
        for i, off in enumerate((0, 4096 * 17 + 512, SIZE - 4096)):
            s.send(Command(100 + i, Cmd.READ, off, 4096))
            s.conn._on_readable()  # what the loop calls when the request arrives
            # The reply is complete before the loop runs again: no task, no thread.
            assert not s.conn.tasks
            assert s.replies_now() == [Reply(100 + i, 0, volume.read_sync(off, 4096))]
    finally:
        s.sock.close()


@pytest.mark.parametrize("structured", [True, False])
async def test_pipelined_mixed_size_reads_return_file_bytes(
    server: NBDServer, volume: Volume, structured: bool
) -> None:
    s = await _session(server, "vol", structured)
    try:
        sizes = [1, 4096, 32 * 1024 - 1, 32 * 1024, 256 * 1024, 1 << 20, 4096]
        want = {}
        off = 12345
        for h, n in enumerate(sizes):
            s.send(Command(h, Cmd.READ, off, n))
            want[h] = volume.read_sync(off, n)
            off = (off + 3 * n + 999) % (SIZE - (1 << 20))
        got = {r.handle: r for r in await s.replies(len(sizes))}
        assert {h: (r.error, r.data) for h, r in got.items()} == {
            h: (0, data) for h, data in want.items()
        }
    finally:
        s.sock.close()


async def test_device_without_file_extent_takes_the_task_path(
    server: NBDServer, volume: Volume
) -> None:
    s = await _session(server, "nofile", True)
    try:
        s.send(Command(1, Cmd.READ, 8192, 4096))
        replies = await s.replies(1)
        assert replies == [Reply(1, 0, volume.read_sync(8192, 4096))]
    finally:
        s.sock.close()

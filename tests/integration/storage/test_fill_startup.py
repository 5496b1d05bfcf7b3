"""The fill's fixed costs: lanes connected while the volume is held (the handshakes are
not paid after a switch), and the source asked for its layout once per window even
when read misses move the fill's cursor from window to window."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from edgevisor.storage.lazy import LazySettings, LazyVolume, RemoteSource
from edgevisor.storage.lazy_fill import _STATUS_WINDOW_BLOCKS
from edgevisor.storage.nbd_client import NBDClient
from edgevisor.storage.nbd_server import Export, NBDServer
from edgevisor.storage.volume import Volume

MiB = 1 << 20
BS = 4096
WINDOWS = 3
SIZE = WINDOWS * _STATUS_WINDOW_BLOCKS * BS  # 48 MiB of 4 KiB blocks


class _StatusCounting:
    """A source device that counts the layout questions (``allocated``) it answers."""

    def __init__(self, vol: Volume) -> None:
        self.vol = vol
        self.status_calls = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self.vol, name)

    def allocated(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        self.status_calls += 1
        return self.vol.allocated(offset, length)


@pytest.fixture
async def source(tmp_path: Path) -> AsyncIterator[tuple[NBDServer, int, bytes, _StatusCounting]]:
    """Mostly holes, with 1 MiB of data at a few places in every window."""
    vol = Volume.create(tmp_path / "src", SIZE, BS)
    content = bytearray(SIZE)
    rng = random.Random(11)
    win = _STATUS_WINDOW_BLOCKS * BS
    for w in range(WINDOWS):
        for k in range(2):
            off = w * win + k * (win // 2) + 4096 * rng.randrange(0, 100)
            data = rng.randbytes(MiB // 2)
            await vol.write(off, data)
            content[off : off + len(data)] = data
    await vol.flush()
    dev = _StatusCounting(vol)
    srv = NBDServer(workers=1)
    srv.add_export(Export("src", dev))  # type: ignore[arg-type]
    _, port = await srv.start("127.0.0.1", 0)
    try:
        yield srv, port, bytes(content), dev
    finally:
        await srv.aclose()
        vol.close()


async def test_layout_is_asked_once_per_window_while_reads_move_the_cursor(
    tmp_path: Path, source: tuple[NBDServer, int, bytes, _StatusCounting]
) -> None:
    _srv, port, content, dev = source

    async def connect() -> RemoteSource:
        return await NBDClient.connect("127.0.0.1", port, "src")

    dst = Volume.create(tmp_path / "dst", SIZE, BS, present=False)
    # Slow enough (3 MiB of data at 1 MiB/s after a 1 MiB burst) that the reads below
    # land while the fill runs.
    cfg = LazySettings(mirror="off", fill_rate_bytes_per_s=MiB)
    lazy = LazyVolume(dst, connect, cfg)
    try:
        lazy.start()
        rng = random.Random(3)
        jumps = 0
        while not lazy.filled.is_set() and jumps < 40:
            off = rng.randrange(0, SIZE // BS) * BS  # anywhere: the cursor jumps there
            assert await lazy.read(off, BS) == content[off : off + BS]
            jumps += 1
            await asyncio.sleep(0.01)
        assert jumps >= 10, "the fill ended before the reads could move its cursor"
        await asyncio.wait_for(lazy.filled.wait(), 60)
        assert await dst.read(0, SIZE) == content
        # Once per window (the old fill asked again at every jump of its cursor).
        assert dev.status_calls <= WINDOWS
    finally:
        await lazy.aclose()
        await dst.aclose()


async def test_a_held_fill_connects_its_lanes_before_the_release(
    tmp_path: Path, source: tuple[NBDServer, int, bytes, _StatusCounting]
) -> None:
    srv, port, content, dev = source

    async def connect() -> RemoteSource:
        return await NBDClient.connect("127.0.0.1", port, "src")

    dst = Volume.create(tmp_path / "dst", SIZE, BS, present=False)
    cfg = LazySettings(mirror="off", fill_connections=2)
    lazy = LazyVolume(dst, connect, cfg, held=True)
    try:
        lazy.start()
        # The main connection and both lanes, all before the release.
        deadline = time.monotonic() + 30
        while srv.connections < 3:
            assert time.monotonic() < deadline, f"{srv.connections} connections while held"
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)
        assert dst.present_blocks == 0 and dev.status_calls == 0  # nothing taken while held
        lazy.release()
        await asyncio.wait_for(lazy.filled.wait(), 60)
        assert await dst.read(0, SIZE) == content
    finally:
        await lazy.aclose()
        await dst.aclose()

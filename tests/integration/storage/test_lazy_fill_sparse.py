"""The fill's cheap paths: holes at the source are not transferred, lane stores go
through O_DIRECT, a lifted rate limit wakes the fill at once, and fast block counting."""

from __future__ import annotations

import asyncio
import mmap
import os
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from edgevisor.storage.bitmap import Bitmap
from edgevisor.storage.lazy import LazySettings, LazyVolume, RemoteSource
from edgevisor.storage.lazy_parts import TokenBucket
from edgevisor.storage.nbd_client import NBDClient
from edgevisor.storage.nbd_server import Export, NBDServer
from edgevisor.storage.volume import Volume

MiB = 1 << 20
BS = 64 * 1024
SIZE = 40 * MiB + 3 * BS + 4096  # a short last block


class _Counting:
    """Counts the bytes the source serves (reads), so a test sees what was transferred."""

    def __init__(self, vol: Volume) -> None:
        self.vol = vol
        self.read_bytes = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self.vol, name)

    async def read(self, offset: int, length: int) -> bytes:
        self.read_bytes += length
        return await self.vol.read(offset, length)

    def file_extent(self, offset: int, length: int) -> tuple[int, int]:
        self.read_bytes += length
        return self.vol.file_extent(offset, length)


@pytest.fixture
async def sparse(tmp_path: Path) -> AsyncIterator[tuple[int, bytes, _Counting]]:
    """A source that is mostly holes, with data islands that start and end mid-block."""
    vol = Volume.create(tmp_path / "src", SIZE, BS)
    content = bytearray(SIZE)
    rng = random.Random(5)
    for off, n in ((0, 3 * BS), (5 * MiB + 100, 2 * BS), (17 * MiB - 10, 20), (SIZE - 5000, 5000)):
        data = rng.randbytes(n)
        await vol.write(off, data)
        content[off : off + n] = data
    await vol.flush()
    dev = _Counting(vol)
    srv = NBDServer(workers=1)
    srv.add_export(Export("src", dev))  # type: ignore[arg-type]
    _, port = await srv.start("127.0.0.1", 0)
    try:
        yield port, bytes(content), dev
    finally:
        await srv.aclose()
        vol.close()


async def test_holes_at_the_source_are_not_transferred(
    tmp_path: Path, sparse: tuple[int, bytes, _Counting]
) -> None:
    port, content, dev = sparse

    async def connect() -> RemoteSource:
        return await NBDClient.connect("127.0.0.1", port, "src")

    dst = Volume.create(tmp_path / "dst", SIZE, BS, present=False)
    # A stale byte where the source has a hole (a fetch before a crash, say): the
    # filled copy must still read zeroes there.
    fd = os.open(dst.data_path, os.O_WRONLY)
    os.pwrite(fd, b"\x77" * 10, 30 * MiB)
    os.close(fd)
    lazy = LazyVolume(dst, connect, LazySettings(mirror="off"))
    # A local write into a hole region before the fill: it must survive the fill.
    await lazy.write(20 * MiB, b"\x55" * BS)
    expected = bytearray(content)
    expected[20 * MiB : 20 * MiB + BS] = b"\x55" * BS
    lazy.start()
    await asyncio.wait_for(lazy.filled.wait(), 60)
    got = await lazy.read(0, SIZE)
    assert got == bytes(expected)
    # Only the blocks holding data crossed the link (islands rounded out to blocks).
    assert dev.read_bytes <= 12 * BS + 2 * BS
    await lazy.aclose()
    await dst.aclose()
    again = Volume.open(tmp_path / "dst")  # present bits were journaled
    try:
        assert again.present_blocks == again.nblocks
        assert again.read_sync(0, SIZE) == bytes(expected)
    finally:
        again.close()


async def test_a_source_without_block_status_gets_everything_fetched(
    tmp_path: Path, sparse: tuple[int, bytes, _Counting]
) -> None:
    port, content, dev = sparse

    class _Plain:  # no block_status: the fill falls back to reading every block
        def __init__(self, c: NBDClient) -> None:
            self.size_bytes = c.size_bytes
            self.read, self.write, self.flush, self.aclose = c.read, c.write, c.flush, c.aclose

    async def connect() -> RemoteSource:
        return _Plain(await NBDClient.connect("127.0.0.1", port, "src"))

    dst = Volume.create(tmp_path / "dst", SIZE, BS, present=False)
    lazy = LazyVolume(dst, connect, LazySettings(mirror="off", fill_connections=0))
    lazy.start()
    await asyncio.wait_for(lazy.filled.wait(), 60)
    assert await lazy.read(0, SIZE) == content
    assert dev.read_bytes >= SIZE
    await lazy.aclose()
    await dst.aclose()


async def test_missing_blocks_count_as_allocated(tmp_path: Path) -> None:
    """A peer asking a lazy volume for holes must not skip blocks that are elsewhere."""
    dst = Volume.create(tmp_path / "dst", 8 * BS, BS, present=False)

    async def connect() -> RemoteSource:
        raise AssertionError("not used")

    lazy = LazyVolume(dst, connect, LazySettings(mirror="off"))
    dst.fill_zero_blocks(2, 2)  # present, and holes locally
    assert lazy.allocated(0, 8 * BS) == [(0, 2 * BS, True), (2 * BS, 2 * BS, False),
                                         (4 * BS, 4 * BS, True)]  # fmt: skip
    await dst.aclose()


def test_direct_fill_stores_match_buffered_ones(tmp_path: Path) -> None:
    vol = Volume.create(tmp_path / "v", 16 * BS, BS, present=False)
    try:
        data = os.urandom(4 * BS)
        buf = mmap.mmap(-1, 4 * BS)  # page aligned: O_DIRECT
        buf[:] = data
        assert vol.fill_blocks(0, memoryview(buf), direct=True) == 4  # type: ignore[arg-type]
        odd = bytearray(1 + 4 * BS)  # misaligned view: falls back to pwrite
        odd[1:] = data
        assert vol.fill_blocks(4, memoryview(odd)[1:], direct=True) == 4  # type: ignore[arg-type]
        vol.mark_present(8 * BS, BS)
        assert vol.fill_blocks(8, data[:BS], direct=True) == 0  # present: left alone
        assert vol.read_sync(0, 4 * BS) == data
        assert vol.read_sync(4 * BS, 4 * BS) == data
        assert vol.read_sync(8 * BS, BS) == bytes(BS)
    finally:
        vol.close()


async def test_lifting_the_rate_limit_wakes_a_waiting_take() -> None:
    bucket = TokenBucket(1024)  # 1 KiB/s: a 1 MiB take would wait ~17 minutes
    waiter = asyncio.create_task(bucket.take(MiB))
    await asyncio.sleep(0.1)
    assert not waiter.done()
    t0 = time.monotonic()
    bucket.set_rate(0)
    await asyncio.wait_for(waiter, 10)
    assert time.monotonic() - t0 < 10


async def test_raising_the_rate_wakes_a_waiting_take() -> None:
    bucket = TokenBucket(1024)
    await bucket.take(1024)  # the initial tokens
    waiter = asyncio.create_task(bucket.take(4096))
    await asyncio.sleep(0.1)
    bucket.set_rate(1 << 30)
    await asyncio.wait_for(waiter, 10)


def test_bitmap_count_matches_a_naive_count() -> None:
    rng = random.Random(3)
    for nbits in (1, 7, 8, 9, 1000, 16385):
        bm = Bitmap(nbits)
        for _ in range(20):
            first = rng.randrange(nbits)
            bm.set_range(first, rng.randrange(nbits - first + 1), rng.random() < 0.6)
        assert bm.count() == sum(bm.get(i) for i in range(nbits))
    assert Bitmap(13, fill=True).count() == 13

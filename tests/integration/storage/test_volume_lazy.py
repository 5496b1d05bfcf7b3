"""LazyVolume against a real NBD source: on-demand fetch, merge, fill, outage, mirroring."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgevisor.storage.lazy import LazySettings, LazyVolume, SourceUnavailable
from edgevisor.storage.nbd_client import NBDClient
from edgevisor.storage.nbd_server import Export, NBDServer
from edgevisor.storage.volume import Volume

MiB = 1 << 20
BS = 64 * 1024
SIZE = 4 * MiB + 3 * BS  # not a multiple of the fill batch


@dataclass
class Source:
    volume: Volume
    server: NBDServer
    port: int
    content: bytes

    async def restart(self) -> None:
        self.server = NBDServer()
        self.server.add_export(Export("src", self.volume))
        await self.server.start("127.0.0.1", self.port)


@pytest.fixture
async def source(tmp_path: Path) -> AsyncIterator[Source]:
    vol = Volume.create(tmp_path / "src", SIZE, BS)
    content = os.urandom(SIZE)
    await vol.write(0, content)
    srv = NBDServer()
    srv.add_export(Export("src", vol))
    _, port = await srv.start("127.0.0.1", 0)
    s = Source(vol, srv, port, content)
    try:
        yield s
    finally:
        await s.server.aclose()
        vol.close()


def make_lazy(tmp_path: Path, src: Source, **kw: object) -> LazyVolume:
    local = Volume.create(tmp_path / "dst", SIZE, BS, present=False)

    async def connect() -> NBDClient:
        return await NBDClient.connect("127.0.0.1", src.port, "src", timeout_s=2)

    settings = LazySettings(reconnect_interval_s=0.05, **kw)  # type: ignore[arg-type]
    return LazyVolume(local, connect, settings)


async def wait_for(cond: object, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def test_reads_fetch_on_demand_then_fill_completes(tmp_path: Path, source: Source) -> None:
    lazy = make_lazy(tmp_path, source, fill_rate_bytes_per_s=256 * 1024)
    try:
        lazy.start()
        # a read far ahead of the (throttled) fill is served on demand, at once
        off = SIZE - BS - 1000
        assert await lazy.read(off, 3000) == source.content[off : off + 3000]
        assert not lazy.progress().done
        before = lazy.progress().bytes_present
        assert (
            await lazy.read(BS * 10 + 5, 70_000) == source.content[BS * 10 + 5 : BS * 10 + 70_005]
        )
        assert lazy.progress().bytes_present >= before  # monotonic
        lazy.set_fill_rate(0)
        await asyncio.wait_for(lazy.filled.wait(), 60)
        p = lazy.progress()
        assert p.done and p.bytes_present == SIZE and p.eta_s == 0.0
        assert await lazy.local.checksum() == hashlib.sha256(source.content).hexdigest()
    finally:
        await lazy.aclose()
        lazy.local.close()
    # present bits survived: a reopened target has nothing missing
    again = Volume.open(tmp_path / "dst")
    assert again.missing_blocks() == []
    again.close()


async def test_partial_write_to_missing_block_merges(tmp_path: Path, source: Source) -> None:
    lazy = make_lazy(tmp_path, source, mirror="off")
    try:
        off = 3 * BS + 100
        await lazy.write(off, b"PATCH")
        blk = await lazy.read(3 * BS, BS)
        expect = bytearray(source.content[3 * BS : 4 * BS])
        expect[100:105] = b"PATCH"
        assert blk == bytes(expect)
        # the source was not touched (mirror off)
        assert await source.volume.read(off, 5) == source.content[off : off + 5]
        # a full-block write needs no fetch and stays after the fill
        await lazy.write(6 * BS, b"\x01" * BS)
        lazy.start()
        await asyncio.wait_for(lazy.filled.wait(), 60)
        assert await lazy.read(6 * BS, BS) == b"\x01" * BS
        assert await lazy.read(3 * BS, BS) == bytes(expect)
    finally:
        await lazy.aclose()
        lazy.local.close()


async def test_sync_and_async_mirroring(tmp_path: Path, source: Source) -> None:
    lazy = make_lazy(tmp_path, source, mirror="sync")
    try:
        await lazy.write(BS + 7, b"sync-mirrored", fua=True)
        assert await source.volume.read(BS + 7, 13) == b"sync-mirrored"
    finally:
        await lazy.aclose()
        lazy.local.close()
    os.rename(tmp_path / "dst", tmp_path / "dst1")
    lazy2 = make_lazy(tmp_path, source, mirror="async")
    try:
        lazy2.start()
        await lazy2.write(2 * BS, b"async" * 10)
        await asyncio.wait_for(lazy2.drain_mirror(), 30)
        assert await source.volume.read(2 * BS, 50) == b"async" * 10
    finally:
        await lazy2.aclose()
        lazy2.local.close()


async def test_source_outage_read_fails_then_fill_resumes(tmp_path: Path, source: Source) -> None:
    lazy = make_lazy(tmp_path, source, fetch_timeout_s=0.5, fill_rate_bytes_per_s=512 * 1024)
    try:
        lazy.start()
        await wait_for(lambda: lazy.progress().bytes_present > 0)
        await source.server.aclose()
        far = lazy.local.missing_blocks()[-1]
        t0 = time.monotonic()
        with pytest.raises(SourceUnavailable):
            await lazy.read(far * BS, 10)
        assert time.monotonic() - t0 >= 0.4  # it waited for the source first
        stalled = lazy.progress().bytes_present
        await source.restart()
        lazy.set_fill_rate(0)
        await asyncio.wait_for(lazy.filled.wait(), 60)
        assert lazy.progress().bytes_present >= stalled
        assert await lazy.local.checksum() == hashlib.sha256(source.content).hexdigest()
    finally:
        await lazy.aclose()
        lazy.local.close()


async def test_lazy_volume_served_over_nbd(tmp_path: Path, source: Source) -> None:
    """A target exports its lazy volume: reads through our server fetch from the source."""
    lazy = make_lazy(tmp_path, source, mirror="off")
    srv = NBDServer(workers=1)
    srv.add_export(Export("lazy", lazy))
    _, port = await srv.start()
    try:
        async with await NBDClient.connect("127.0.0.1", port, "lazy") as c:
            got = await c.read(BS * 20, 3 * BS)
            assert got == source.content[BS * 20 : BS * 23]
            sync = await c.block_status(BS * 19, 5 * BS, "edgevisor:sync")
            assert [(o, n, st) for o, n, st in sync] == [
                (19 * BS, BS, 1),
                (20 * BS, 3 * BS, 0),
                (23 * BS, BS, 1),
            ]
    finally:
        await srv.aclose()
        await lazy.aclose()
        lazy.local.close()

"""A lazy volume created held (a migration's target, staged before the switch) takes no
byte from its source until released: the source's data is not final before that."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from edgevisor.storage.lazy import LazySettings, LazyVolume, SourceUnavailable
from edgevisor.storage.nbd_client import NBDClient
from edgevisor.storage.nbd_server import Export, NBDServer
from edgevisor.storage.volume import Volume

BS = 64 * 1024
SIZE = 2 << 20


@pytest.fixture
async def source(tmp_path: Path) -> AsyncIterator[tuple[Volume, int]]:
    vol = Volume.create(tmp_path / "src", SIZE, BS)
    await vol.write(0, b"\x01" * SIZE)
    srv = NBDServer()
    srv.add_export(Export("src", vol))
    _, port = await srv.start("127.0.0.1", 0)
    try:
        yield vol, port
    finally:
        await srv.aclose()
        vol.close()


@contextlib.asynccontextmanager
async def lazy_on(path: Path, port: int, *, held: bool) -> AsyncIterator[LazyVolume]:
    """A lazy volume at ``path`` whose source is the fixture's NBD export; closed after."""
    local = Volume.create(path, SIZE, BS, present=False)

    async def connect() -> NBDClient:
        return await NBDClient.connect("127.0.0.1", port, "src", timeout_s=2)

    lazy = LazyVolume(local, connect, LazySettings(reconnect_interval_s=0.05), held=held)
    try:
        yield lazy
    finally:
        await lazy.aclose()
        local.close()


async def test_held_volume_fetches_nothing_until_released(
    tmp_path: Path, source: tuple[Volume, int]
) -> None:
    src, port = source
    async with lazy_on(tmp_path / "dst", port, held=True) as lazy:
        lazy.start()  # the fill (unlimited) waits for the release
        assert lazy.held
        read = asyncio.ensure_future(lazy.read(BS, 100))
        write = asyncio.ensure_future(lazy.write(0, b"\x03" * BS))  # a whole block
        await asyncio.sleep(0.5)
        assert not read.done() and not write.done()
        assert lazy.progress().bytes_present == 0  # nothing fetched, nothing stored
        await lazy.flush()  # a flush passes (the loop device's fsync when staged)

        # The source's final data (written while the target holds), then the release.
        await src.write(0, b"\x02" * SIZE)
        lazy.release()
        assert not lazy.held
        assert await asyncio.wait_for(read, 30) == b"\x02" * 100
        await asyncio.wait_for(write, 30)
        assert await src.read(0, BS) == b"\x03" * BS  # mirrored only after the release
        await asyncio.wait_for(lazy.filled.wait(), 60)
        assert await lazy.read(BS, SIZE - BS) == b"\x02" * (SIZE - BS)


async def test_unheld_volume_is_not_gated(tmp_path: Path, source: tuple[Volume, int]) -> None:
    _src, port = source
    async with lazy_on(tmp_path / "dst2", port, held=False) as lazy:
        assert not lazy.held
        assert await asyncio.wait_for(lazy.read(0, 10), 30) == b"\x01" * 10
        lazy.release()  # idempotent, harmless


async def test_time_held_earns_the_fill_no_burst(
    tmp_path: Path, source: tuple[Volume, int]
) -> None:
    _src, port = source
    async with lazy_on(tmp_path / "dst3", port, held=True) as lazy:
        lazy.set_fill_rate(512 * 1024)  # a trickle: one batch (16 blocks, 1 MiB) per 2 s
        lazy.start()
        await asyncio.sleep(2.5)  # held: a bucket that kept filling would allow a batch
        lazy.release()
        await asyncio.sleep(0.3)  # released: the bucket starts empty
        assert lazy.progress().bytes_present == 0
        lazy.set_fill_rate(0)  # unlimited: the fill goes on and completes
        await asyncio.wait_for(lazy.filled.wait(), 60)
        assert await lazy.read(0, 10) == b"\x01" * 10


async def test_closing_a_held_volume_fails_what_waits_for_the_release(
    tmp_path: Path, source: tuple[Volume, int]
) -> None:
    """A migration rolled back before the switch discards its held volume: a read that
    waited for the release must fail then, not wait for ever."""
    _src, port = source
    async with lazy_on(tmp_path / "dst4", port, held=True) as lazy:
        lazy.start()
        read = asyncio.ensure_future(lazy.read(0, 100))
        await asyncio.sleep(0.3)
        assert not read.done()
        await lazy.aclose()
        with pytest.raises(SourceUnavailable):
            await asyncio.wait_for(read, 30)
        assert lazy.progress().bytes_present == 0

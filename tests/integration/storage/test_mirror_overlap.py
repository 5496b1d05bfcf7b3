"""Sync-mirrored writes of a lazy volume (issue 6, foreground writes during post-sync).

The local write and the source's round trip run at once; a write is still acknowledged
only when both copies have it, overlapping writes reach both copies in one order, and a
fill lane storing a batch no longer stalls the event loop (a write to other blocks goes
on; a write to the blocks being stored waits for that store and wins).
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from edgevisor.storage.lazy import LazySettings, LazyVolume, RemoteSource
from edgevisor.storage.nbd_client import NBDClient
from edgevisor.storage.nbd_server import Export, NBDServer
from edgevisor.storage.volume import Volume

BS = 64 * 1024
NBLOCKS = 64
SIZE = NBLOCKS * BS


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[Volume, int, bytes]]:
    vol = Volume.create(tmp_path / "src", SIZE, BS)
    content = os.urandom(SIZE)
    await vol.write(0, content)
    srv = NBDServer()
    srv.add_export(Export("src", vol))
    _, port = await srv.start("127.0.0.1", 0)
    try:
        yield vol, port, content
    finally:
        await srv.aclose()
        vol.close()


class SlowSource:
    """A source whose writes take ``delay()`` seconds before they are sent; records
    when each write was started and finished (loop time)."""

    def __init__(self, client: NBDClient, delay: object) -> None:
        self._c = client
        self._delay = delay
        self.size_bytes = client.size_bytes
        self.read, self.flush, self.aclose = client.read, client.flush, client.aclose
        self.log: list[tuple[str, int, float]] = []

    async def write(self, offset: int, data: bytes, *, fua: bool = False) -> None:
        loop = asyncio.get_running_loop()
        self.log.append(("start", offset, loop.time()))
        await asyncio.sleep(self._delay())  # type: ignore[operator]
        await self._c.write(offset, data, fua=fua)
        self.log.append(("done", offset, loop.time()))


def _lazy(tmp_path: Path, port: int, delay: object) -> tuple[LazyVolume, list[SlowSource]]:
    local = Volume.create(tmp_path / "dst", SIZE, BS, present=False)
    made: list[SlowSource] = []

    async def connect() -> RemoteSource:
        s = SlowSource(await NBDClient.connect("127.0.0.1", port, "src", timeout_s=5), delay)
        made.append(s)
        return s

    cfg = LazySettings(mirror="sync", fill_connections=0, reconnect_interval_s=0.05)
    return LazyVolume(local, connect, cfg), made


async def test_local_write_runs_during_the_mirror_and_ack_waits_for_both(
    tmp_path: Path, served: tuple[Volume, int, bytes]
) -> None:
    src, port, _ = served
    lazy, made = _lazy(tmp_path, port, lambda: 0.3)
    local_done: list[float] = []
    real_write = lazy.local.write

    async def local_write(offset: int, data: bytes, *, fua: bool = False) -> None:
        await asyncio.sleep(0.3)  # a slow local disk
        await real_write(offset, data, fua=fua)
        local_done.append(asyncio.get_running_loop().time())

    lazy.local.write = local_write  # type: ignore[method-assign]
    try:
        await lazy.read(3 * BS, BS)  # connected, and the block present (no merge fetch)
        data = os.urandom(BS)
        await asyncio.wait_for(lazy.write(3 * BS, data), 30)
        (s,) = made
        (start,) = [t for k, _, t in s.log if k == "start"]
        (done,) = [t for k, _, t in s.log if k == "done"]
        # overlapped: the source's round trip began before the (slow) local write ended,
        # and the local write ended before the (slow) round trip did
        assert local_done and start < local_done[0] < done
        # acknowledged only once both copies have it
        assert await src.read(3 * BS, BS) == data
        assert await lazy.local.read(3 * BS, BS) == data
    finally:
        await lazy.aclose()
        lazy.local.close()


async def test_overlapping_writes_reach_both_copies_in_one_order(
    tmp_path: Path, served: tuple[Volume, int, bytes]
) -> None:
    src, port, _ = served
    rng = random.Random(6)
    # Random source delays would reorder overlapping writes on the source if they ran
    # at once; they must reach it in the order they reached the local copy.
    lazy, _ = _lazy(tmp_path, port, lambda: rng.uniform(0, 0.03))
    try:
        await lazy.read(0, 4 * BS)  # present: the writes need no merge fetch
        writes = [(rng.randrange(0, 3 * BS), os.urandom(rng.randrange(1, BS))) for _ in range(40)]
        await asyncio.wait_for(asyncio.gather(*(lazy.write(off, d) for off, d in writes)), 60)
        assert await lazy.local.read(0, 4 * BS) == await src.read(0, 4 * BS)
    finally:
        await lazy.aclose()
        lazy.local.close()


@pytest.fixture
def held_lane_disk(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """``pwrite`` on threads other than the main one (the fill lanes') waits until the
    returned event is set (or 30 s)."""
    go = threading.Event()
    real = os.pwrite
    main = threading.main_thread()

    def pwrite(fd: int, data: object, offset: int) -> int:
        if threading.current_thread() is not main:
            go.wait(30)
        return real(fd, data, offset)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "pwrite", pwrite)
    try:
        yield go
    finally:
        go.set()


async def test_lane_store_does_not_stall_writes_and_a_write_to_its_blocks_wins(
    tmp_path: Path, served: tuple[Volume, int, bytes], held_lane_disk: threading.Event
) -> None:
    src, port, _ = served
    local = Volume.create(tmp_path / "dst", SIZE, BS, present=False)

    async def connect() -> RemoteSource:
        return await NBDClient.connect("127.0.0.1", port, "src", timeout_s=5)

    cfg = LazySettings(
        mirror="sync", fill_connections=1, fill_batch_blocks=2, fill_inflight=1,
        reconnect_interval_s=0.05,
    )  # fmt: skip
    lazy = LazyVolume(local, connect, cfg)
    try:
        lazy.start()
        for _ in range(1500):  # a lane is now inside its (held) store
            if lazy._claims.storing:
                break
            await asyncio.sleep(0.01)
        assert lazy._claims.storing, "the fill never started storing"
        lo, hi = lazy._claims.storing[0]
        # A write elsewhere completes while the lane is stuck in its store.
        other = (hi + 4) % NBLOCKS
        data = os.urandom(BS)
        await asyncio.wait_for(lazy.write(other * BS, data), 10)
        assert lazy._claims.storing == [(lo, hi)]
        assert await src.read(other * BS, BS) == data
        # A write to a block being stored waits for that store, then lands on top of it.
        mine = os.urandom(BS)
        w = asyncio.create_task(lazy.write(lo * BS, mine))
        await asyncio.sleep(0.3)
        assert not w.done()
        held_lane_disk.set()
        await asyncio.wait_for(w, 30)
        await asyncio.wait_for(lazy.filled.wait(), 60)
        assert await lazy.read(lo * BS, BS) == mine
        assert await src.read(lo * BS, BS) == mine
        assert await lazy.read(other * BS, BS) == data
    finally:
        held_lane_disk.set()
        await lazy.aclose()
        local.close()

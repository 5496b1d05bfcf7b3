"""The fast fill path: zero-copy ``read_into``, fill lanes on threads, background flushes."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from edgevisor.storage.lazy import LazySettings, LazyVolume, RemoteSource
from edgevisor.storage.nbd_client import NBDClient
from edgevisor.storage.nbd_server import Export, NBDServer
from edgevisor.storage.volume import Volume

MiB = 1 << 20
BS = 64 * 1024
SIZE = 6 * MiB + 5 * BS  # not a multiple of the fill batch


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[int, bytes, Volume]]:
    vol = Volume.create(tmp_path / "src", SIZE, BS)
    content = os.urandom(SIZE)
    await vol.write(0, content)
    srv = NBDServer(workers=2, max_payload=256 * 1024)  # small: reads get split
    srv.add_export(Export("src", vol))
    _, port = await srv.start("127.0.0.1", 0)
    try:
        yield port, content, vol
    finally:
        await srv.aclose()
        vol.close()


async def test_read_into_splits_and_lands_in_place(served: tuple[int, bytes, Volume]) -> None:
    port, content, _ = served
    async with await NBDClient.connect("127.0.0.1", port, "src") as c:
        buf = bytearray(b"\xaa" * (MiB + 100))
        await c.read_into(BS - 7, buf)  # > max payload: four pieces in parallel
        assert buf == content[BS - 7 : BS - 7 + MiB + 100]
        small = bytearray(10)
        await c.read_into(SIZE - 10, memoryview(small))
        assert small == content[-10:]
        assert await c.read(0, 4096) == content[:4096]  # plain reads still work after
        assert c.in_flight == 0


class _NoEndpoint:
    """A source that cannot say where it is: the fill uses lanes with their own loops."""

    def __init__(self, client: NBDClient) -> None:
        self._c = client
        self.size_bytes = client.size_bytes
        self.read, self.read_into, self.write = client.read, client.read_into, client.write
        self.flush, self.aclose = client.flush, client.aclose


def _lazy(
    tmp_path: Path, port: int, threads: list[set[str]], *, blocking: bool = True, **kw: object
) -> LazyVolume:
    local = Volume.create(tmp_path / "dst", SIZE, BS, present=False)

    async def connect() -> RemoteSource:
        threads[0].add(threading.current_thread().name)
        c = await NBDClient.connect("127.0.0.1", port, "src", timeout_s=5)
        return c if blocking else _NoEndpoint(c)

    settings = LazySettings(reconnect_interval_s=0.05, mirror="off", **kw)
    return LazyVolume(local, connect, settings)


@pytest.mark.parametrize("blocking", [True, False], ids=["blocking-lanes", "loop-lanes"])
async def test_fill_over_lanes_completes_durably(
    tmp_path: Path, served: tuple[int, bytes, Volume], blocking: bool
) -> None:
    port, content, _ = served
    names: list[set[str]] = [set()]
    lazy = _lazy(tmp_path, port, names, blocking=blocking, fill_connections=3,
                 fill_batch_blocks=4, flush_every_blocks=8)  # fmt: skip
    try:
        lazy.start()
        seen = []
        while not lazy.filled.is_set():
            seen.append(lazy.progress().bytes_present)
            names[0] |= {t.name for t in threading.enumerate()}
            await asyncio.sleep(0.005)
        assert seen == sorted(seen)  # progress never goes backwards
        assert await lazy.local.checksum() == hashlib.sha256(content).hexdigest()
        # the fill's connections lived on their own threads, and are gone now
        assert {n for n in names[0] if n.startswith("lazy-fill-")} == {
            "lazy-fill-0",
            "lazy-fill-1",
            "lazy-fill-2",
        }
        assert not [t for t in threading.enumerate() if t.name.startswith("lazy-fill-")]
        assert not [t for t in threading.enumerate() if t.name.startswith("lazy-store")]
    finally:
        await lazy.aclose()
        lazy.local.close()
    again = Volume.open(tmp_path / "dst")  # present bits were journaled
    assert again.missing_blocks() == []
    again.close()


async def test_read_miss_and_writes_during_a_throttled_fill(
    tmp_path: Path, served: tuple[int, bytes, Volume]
) -> None:
    port, content, _ = served
    lazy = _lazy(tmp_path, port, [set()], fill_rate_bytes_per_s=2 * MiB, fill_batch_blocks=4)
    try:
        lazy.start()
        far = SIZE - 3 * BS
        t0 = time.monotonic()
        assert await lazy.read(far, BS) == content[far : far + BS]
        assert time.monotonic() - t0 < 5  # not queued behind the 2 MiB/s fill
        await lazy.write(far + 10, b"local")  # a partial write to a fetched block
        await lazy.write(4 * BS, b"\x07" * BS)  # a whole block, maybe being filled now
        lazy.set_fill_rate(0)
        await asyncio.wait_for(lazy.filled.wait(), 60)
        assert await lazy.read(4 * BS, BS) == b"\x07" * BS
        expect = bytearray(content[far : far + BS])
        expect[10:15] = b"local"
        assert await lazy.read(far, BS) == bytes(expect)
    finally:
        await lazy.aclose()
        lazy.local.close()


async def test_close_mid_fill_stops_lanes_and_keeps_present_blocks_right(
    tmp_path: Path, served: tuple[int, bytes, Volume]
) -> None:
    port, content, _ = served
    lazy = _lazy(tmp_path, port, [set()], fill_rate_bytes_per_s=4 * MiB, fill_batch_blocks=2)
    try:
        lazy.start()
        deadline = time.monotonic() + 30
        while lazy.progress().bytes_present < MiB:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
    finally:
        await asyncio.wait_for(lazy.aclose(), 30)
    assert not lazy.filled.is_set()
    assert not [t for t in threading.enumerate() if t.name.startswith("lazy-fill-")]
    assert not [t for t in threading.enumerate() if t.name.startswith("lazy-store")]
    vol = lazy.local
    present = [b for b in range(vol.nblocks) if vol.is_present(b)]
    assert present and len(present) < vol.nblocks
    for b in present:
        assert vol.read_sync(b * BS, min(BS, SIZE - b * BS)) == content[b * BS : (b + 1) * BS]
    vol.close()


@pytest.mark.parametrize("blocking", [True, False], ids=["blocking-lanes", "loop-lanes"])
async def test_fill_resumes_after_the_source_restarts(tmp_path: Path, blocking: bool) -> None:
    vol = Volume.create(tmp_path / "src", SIZE, BS)
    content = os.urandom(SIZE)
    await vol.write(0, content)
    srv = NBDServer(workers=1)
    srv.add_export(Export("src", vol))
    _, port = await srv.start("127.0.0.1", 0)
    lazy = _lazy(tmp_path, port, [set()], blocking=blocking, fill_rate_bytes_per_s=2 * MiB,
                 fetch_timeout_s=0.3)  # fmt: skip
    try:
        lazy.start()
        deadline = time.monotonic() + 30
        while lazy.progress().bytes_present == 0:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        await srv.aclose()
        await asyncio.sleep(0.5)  # lanes lose their connections, fetches time out
        stalled = lazy.progress().bytes_present
        srv = NBDServer(workers=1)
        srv.add_export(Export("src", vol))
        await srv.start("127.0.0.1", port)
        lazy.set_fill_rate(0)
        await asyncio.wait_for(lazy.filled.wait(), 60)
        assert lazy.progress().bytes_present >= stalled
        assert await lazy.local.checksum() == hashlib.sha256(content).hexdigest()
    finally:
        await lazy.aclose()
        lazy.local.close()
        await srv.aclose()
        vol.close()

"""Exact copy comparison of a mirrored lazy volume under continuous writes (issue 6 verify).

A writer hammers one block while both copies are compared range by range under the lazy
volume's write barrier: every comparison must agree. A block corrupted on the source
behind the mirror's back must still be found, and pushing the differences repairs it.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgevisor.storage.copy_compare import compare_copies, push_differences
from edgevisor.storage.lazy import LazySettings, LazyVolume
from edgevisor.storage.nbd_client import NBDClient
from edgevisor.storage.nbd_server import Export, NBDServer
from edgevisor.storage.volume import Volume

MiB = 1 << 20
BS = 64 * 1024
SIZE = 4 * MiB
HOT = 2 * MiB + 5 * BS  # the block the writer hammers


@dataclass
class Pair:
    source: Volume
    lazy: LazyVolume
    port: int


@pytest.fixture(params=["sync", "async"])
async def pair(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Pair]:
    src = Volume.create(tmp_path / "src", SIZE, BS)
    await src.write(0, os.urandom(SIZE))
    srv = NBDServer()
    srv.add_export(Export("src", src))
    _, port = await srv.start("127.0.0.1", 0)
    local = Volume.create(tmp_path / "dst", SIZE, BS, present=False)

    async def connect() -> NBDClient:
        return await NBDClient.connect("127.0.0.1", port, "src", timeout_s=5)

    lazy = LazyVolume(local, connect, LazySettings(mirror=request.param, reconnect_interval_s=0.05))
    try:
        lazy.start()
        await asyncio.wait_for(lazy.filled.wait(), 60)
        yield Pair(src, lazy, port)
    finally:
        await lazy.aclose()
        local.close()
        await srv.aclose()
        src.close()


async def _hammer(lazy: LazyVolume, stop: asyncio.Event, count: list[int]) -> None:
    i = 0
    while not stop.is_set():
        i += 1
        # Different bytes every time, partly overlapping the previous write.
        await lazy.write(HOT + (i % 7) * 512, os.urandom(4096 + (i % 3) * 4096))
        count[0] += 1
        await asyncio.sleep(0)


async def test_hammered_block_never_fails_verify(pair: Pair) -> None:
    client = await NBDClient.connect("127.0.0.1", pair.port, "src", timeout_s=5)
    stop = asyncio.Event()
    count = [0]
    writer = asyncio.create_task(_hammer(pair.lazy, stop, count))
    try:
        deadline = time.monotonic() + 60
        overlapped = 0
        for _ in range(12):
            before = count[0]
            res = await compare_copies(pair.lazy, client, chunk=256 * 1024)
            assert res.mismatch is None, f"copies differ at {res.mismatch} under writes"
            overlapped += count[0] - before
            if overlapped >= 50 or time.monotonic() > deadline:
                break
        # The check means something only if the writer really wrote while comparing.
        assert overlapped > 0
    finally:
        stop.set()
        await writer
        await client.aclose()
    await pair.lazy.drain_mirror()
    # And the copies really agree once quiet (exact bytes, not only the comparison).
    assert await pair.lazy.read(0, SIZE) == await pair.source.read(0, SIZE)


async def test_corrupted_source_block_is_found_and_pushed(pair: Pair) -> None:
    client = await NBDClient.connect("127.0.0.1", pair.port, "src", timeout_s=5)
    stop = asyncio.Event()
    count = [0]
    writer = asyncio.create_task(_hammer(pair.lazy, stop, count))
    try:
        bad = 3 * MiB + 12345
        # Behind the mirror's back: the source copy no longer matches.
        old = await pair.source.read(bad, 100)
        await pair.source.write(bad, bytes(b ^ 0xFF for b in old))
        res = await compare_copies(pair.lazy, client, chunk=256 * 1024)
        lo = (bad // (256 * 1024)) * 256 * 1024
        assert res.mismatch == (lo, 256 * 1024)
        pushed = await push_differences(pair.lazy, client, chunk=256 * 1024)
        assert pushed >= 256 * 1024
        res = await compare_copies(pair.lazy, client, chunk=256 * 1024)
        assert res.mismatch is None
    finally:
        stop.set()
        await writer
        await client.aclose()
    await pair.lazy.drain_mirror()
    assert await pair.lazy.read(0, SIZE) == await pair.source.read(0, SIZE)

"""Regression (issue 5): the parallel fill must never store fetched bytes over a newer write.

The first parallel fill (commit 082b0dc, reverted) lost acknowledged writes: a fill lane
checked "block still missing" on its thread and wrote the block a moment later, while a
read miss had fetched the same block on the main connection (both claimed it) and the
domain wrote it in between. The lane's late ``pwrite`` put the source's old bytes back.
A slow disk on the lanes' threads (a delay before each ``pwrite`` there) widens that
window so the test finds it in a few seconds; the fixed fill must come out exact.
"""

from __future__ import annotations

import asyncio
import os
import random
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
NBLOCKS = 96
SIZE = NBLOCKS * BS


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[int, bytes]]:
    vol = Volume.create(tmp_path / "src", SIZE, BS)
    content = os.urandom(SIZE)
    await vol.write(0, content)
    srv = NBDServer(workers=1)
    srv.add_export(Export("src", vol))
    _, port = await srv.start("127.0.0.1", 0)
    try:
        yield port, content
    finally:
        await srv.aclose()
        vol.close()


@pytest.fixture
def slow_lane_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every ``pwrite`` off the main thread (the fill lanes') is 3 ms late."""
    real = os.pwrite
    main = threading.main_thread()

    def pwrite(fd: int, data: object, offset: int) -> int:
        if threading.current_thread() is not main:
            time.sleep(0.003)
        return real(fd, data, offset)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "pwrite", pwrite)


async def _domain(lazy: LazyVolume, blocks: list[int], expect: dict[int, bytes], seed: int) -> int:
    """Walk ``blocks`` like a program would: read a little of each (a miss fetches it on
    demand), overwrite it whole, read it back. Returns how many read-backs were wrong."""
    rng = random.Random(seed)
    wrong = 0
    for b in blocks:
        off = b * BS
        await lazy.read(off + rng.randrange(BS - 100), 100)
        data = rng.randbytes(BS)
        await lazy.write(off, data)
        expect[b] = data
        if rng.random() < 0.5:
            await asyncio.sleep(0)  # let the fill and other walkers run in between
        if await lazy.read(off, BS) != data:
            wrong += 1
    return wrong


class _NoEndpoint:
    """Hides the client's endpoint: the fill then uses lanes with event loops."""

    def __init__(self, client: NBDClient) -> None:
        self.size_bytes = client.size_bytes
        self.read, self.read_into, self.write = client.read, client.read_into, client.write
        self.flush, self.aclose = client.flush, client.aclose


@pytest.mark.usefixtures("slow_lane_disk")
@pytest.mark.parametrize("blocking", [True, False], ids=["blocking-lanes", "loop-lanes"])
async def test_fill_lanes_never_overwrite_acknowledged_writes(
    tmp_path: Path, served: tuple[int, bytes], blocking: bool
) -> None:
    port, content = served
    lost: list[int] = []
    wrong_readbacks = 0
    for rnd in range(3):  # fresh lazy volumes: the race needs missing blocks
        local = Volume.create(tmp_path / f"dst{rnd}", SIZE, BS, present=False)

        async def connect() -> RemoteSource:
            c = await NBDClient.connect("127.0.0.1", port, "src", timeout_s=5)
            return c if blocking else _NoEndpoint(c)

        cfg = LazySettings(
            mirror="off", fill_connections=2, fill_batch_blocks=2, fill_inflight=4,
            reconnect_interval_s=0.05,
        )  # fmt: skip
        lazy = LazyVolume(local, connect, cfg)
        expect: dict[int, bytes] = {}
        try:
            lazy.start()
            walkers = [list(range(i, NBLOCKS, 4)) for i in range(4)]
            counts = await asyncio.wait_for(
                asyncio.gather(
                    *(_domain(lazy, w, expect, rnd * 10 + i) for i, w in enumerate(walkers))
                ),
                120,
            )
            wrong_readbacks += sum(counts)
            await asyncio.wait_for(lazy.filled.wait(), 60)
            for b in range(NBLOCKS):
                want = expect.get(b, content[b * BS : (b + 1) * BS])
                if await lazy.read(b * BS, BS) != want:
                    lost.append(b)
        finally:
            await lazy.aclose()
            local.close()
    assert not lost and not wrong_readbacks, (
        f"{len(lost)} blocks lost their acknowledged write; {wrong_readbacks} read-backs wrong"
    )

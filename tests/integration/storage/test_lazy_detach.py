"""Issue 6: a lazy volume rides out a source that drops and returns, and detaches (the
agent's promote) without failing any I/O in flight.

The domain's ext4 sits on the lazy volume: one failed write or flush and it goes
read-only. So reads, writes (partial and whole blocks) and flushes run without pause while
the source server is killed and restarted, during the fill and again around the detach;
not one may fail, and both copies must end identical to what the domain wrote.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from edgevisor.storage.lazy import LazySettings, LazyVolume
from edgevisor.storage.nbd_client import NBDClient
from edgevisor.storage.nbd_server import Export, NBDServer
from edgevisor.storage.volume import Volume

MiB = 1 << 20
BS = 64 * 1024
NBLOCKS = 64
SIZE = NBLOCKS * BS
WORKERS = 4


@dataclass
class Source:
    volume: Volume
    port: int
    server: NBDServer | None = None

    async def start(self) -> None:
        self.server = NBDServer(workers=1)
        self.server.add_export(Export("src", self.volume))
        _, self.port = await self.server.start("127.0.0.1", self.port)

    async def kill(self) -> None:
        if self.server is not None:
            await self.server.aclose()
            self.server = None


@pytest.fixture
async def source(tmp_path: Path) -> AsyncIterator[tuple[Source, bytes]]:
    vol = Volume.create(tmp_path / "src", SIZE, BS)
    content = os.urandom(SIZE)
    await vol.write(0, content)
    s = Source(vol, 0)
    await s.start()
    try:
        yield s, content
    finally:
        await s.kill()
        vol.close()


def make_lazy(tmp_path: Path, src: Source, **kw: object) -> LazyVolume:
    local = Volume.create(tmp_path / "dst", SIZE, BS, present=False)

    async def connect() -> NBDClient:
        return await NBDClient.connect("127.0.0.1", src.port, "src", timeout_s=2)

    settings = LazySettings(reconnect_interval_s=0.05, fetch_timeout_s=20, **kw)
    return LazyVolume(local, connect, settings)


async def wait_for(cond: Callable[[], bool], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


@dataclass
class Domain:
    """Writers with disjoint blocks (so the expected image is exact), plus readers and
    flushes; every acknowledged write goes into ``model``."""

    lazy: LazyVolume
    model: bytearray
    errors: list[BaseException] = field(default_factory=list)
    ops: int = 0
    stop: bool = False
    detach_began: bool = False
    after_detach: set[int] = field(default_factory=set)  # blocks written from then on

    async def worker(self, i: int) -> None:
        rng = random.Random(i)
        mine = list(range(i, NBLOCKS - 1, WORKERS))  # the last block is the test's own
        while not self.stop:
            try:
                b = rng.choice(mine)
                kind = rng.random()
                if kind < 0.4:
                    off = b * BS + rng.randrange(BS - 5000)
                    n = rng.randrange(1, 5000)
                    got = await self.lazy.read(off, n)
                    if got != self.model[off : off + n]:
                        raise AssertionError(f"read at {off}+{n} returned wrong bytes")
                elif kind < 0.85:
                    whole = rng.random() < 0.5
                    off = b * BS if whole else b * BS + rng.randrange(BS - 5000)
                    data = rng.randbytes(BS if whole else rng.randrange(1, 5000))
                    late = self.detach_began
                    await self.lazy.write(off, data, fua=rng.random() < 0.1)
                    self.model[off : off + len(data)] = data
                    if late:
                        self.after_detach.add(b)
                else:
                    await self.lazy.flush()
                self.ops += 1
            except Exception as e:  # any failure is what this test looks for
                self.errors.append(e)
                return
            await asyncio.sleep(0.001)


async def test_io_never_fails_across_source_restarts_and_detach(
    tmp_path: Path, source: tuple[Source, bytes]
) -> None:
    src, content = source
    lazy = make_lazy(tmp_path, src, mirror="sync", fill_rate_bytes_per_s=MiB, fill_batch_blocks=2)
    dom = Domain(lazy, bytearray(content))
    workers = [asyncio.create_task(dom.worker(i)) for i in range(WORKERS)]
    try:
        lazy.start()
        await wait_for(lambda: dom.ops > 50 and lazy.progress().bytes_present > 4 * BS)
        assert not lazy.progress().done
        for _ in range(2):  # the source dies mid-fill and comes back
            await src.kill()
            n = dom.ops
            await asyncio.sleep(0.5)
            await src.start()
            await wait_for(lambda n=n: dom.ops > n + 30 or bool(dom.errors))  # type: ignore[misc]
        assert not dom.errors, dom.errors
        lazy.set_fill_rate(0)
        await asyncio.wait_for(lazy.filled.wait(), 60)
        # Promote: detach while I/O runs and the link drops once more right then.
        await src.kill()
        last = (NBLOCKS - 1) * BS
        held = asyncio.create_task(lazy.write(last, b"in flight at detach"))
        await asyncio.sleep(0.2)
        assert not held.done()  # the mirrored write waits for the source
        dom.detach_began = True
        detaching = asyncio.create_task(lazy.aclose())  # what the agent's promote calls
        await asyncio.sleep(0.4)
        assert not detaching.done()  # it waits for the I/O that needs the source
        await src.start()
        await asyncio.wait_for(detaching, 40)
        await held  # completed, on both copies
        dom.model[last : last + 19] = b"in flight at detach"
        assert lazy.detached
        # Purely local from now on: the source may go away for good.
        await src.kill()
        n = dom.ops
        await wait_for(lambda: dom.ops > n + 50 or bool(dom.errors))
    finally:
        dom.stop = True
        await asyncio.gather(*workers)
        if not lazy.detached:
            await lazy.aclose()
    assert not dom.errors, dom.errors
    assert lazy.local.read_sync(0, SIZE) == bytes(dom.model)
    theirs = src.volume.read_sync(0, SIZE)
    for b in range(NBLOCKS):
        if b not in dom.after_detach:
            assert theirs[b * BS : (b + 1) * BS] == dom.model[b * BS : (b + 1) * BS], b
    lazy.local.close()


async def test_flush_waits_for_a_reconnect(tmp_path: Path, source: tuple[Source, bytes]) -> None:
    """A flush that meets a dead connection reconnects (within fetch_timeout_s) instead
    of failing: a failed flush makes ext4 abort its journal."""
    src, _ = source
    lazy = make_lazy(tmp_path, src, mirror="sync")
    try:
        await lazy.write(3 * BS, b"x" * BS)  # the main connection is up now
        await src.kill()
        flushing = asyncio.create_task(lazy.flush())
        await asyncio.sleep(0.3)
        assert not flushing.done()
        await src.start()
        await asyncio.wait_for(flushing, 20)
        assert src.volume.read_sync(3 * BS, BS) == b"x" * BS
    finally:
        await lazy.aclose()
        lazy.local.close()


async def test_detach_refused_while_filling(tmp_path: Path, source: tuple[Source, bytes]) -> None:
    src, content = source
    lazy = make_lazy(tmp_path, src, mirror="off")
    try:
        from edgevisor.errors import Conflict

        with pytest.raises(Conflict):
            await lazy.detach()
        assert await lazy.read(BS, 10) == content[BS : BS + 10]  # still attached
    finally:
        await lazy.aclose()
        lazy.local.close()

"""Where fetched blocks and local writes meet in a :class:`~edgevisor.storage.lazy.LazyVolume`
(rules 2 and 3 of its theory of operation; split out of it).

A store on a lane thread decides under :attr:`StoreClaims.lock` which blocks to write
(those neither present nor named by a local write) and claims them in the same step; it
writes them outside the lock (a lock held across a 1 MiB ``O_DIRECT`` write would stall
the owning loop) and drops the claim when done. A local write names its blocks under the
lock and then waits until no store claim overlaps them before it touches the data file;
the name stays until its present bits are set. A store is therefore entirely before the
write's data (the write wins) or sees the block taken (and skips it). Stores on the owning
loop are synchronous (check, ``pwrite``, mark), so nothing interleaves with them.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Mapping
from typing import cast

from edgevisor.storage.mirror_stats import MirrorStats
from edgevisor.storage.volume import Volume

__all__ = ["StoreClaims"]

_STORE_POLL_S = 0.0002
"""How often a write that found a lane storing its blocks looks again."""

Span = tuple[int, int]


class StoreClaims:
    """Block spans of local writes and of lane stores under way, and the stores."""

    def __init__(self, local: Volume, inflight: Mapping[int, object], stats: MirrorStats) -> None:
        self.local = local
        self.inflight = inflight  # blocks a fetch has claimed (rule 1)
        self.stats = stats
        self.lock = threading.Lock()  # only ever held for bookkeeping, never across I/O
        self.writing: list[Span] = []  # block spans of local writes under way
        self.storing: list[Span] = []  # block spans of lane stores under way

    @contextlib.asynccontextmanager
    async def write(self, span: Span) -> AsyncIterator[None]:
        """Name a local write's blocks so lane stores skip them, then wait out a lane
        store of those blocks that began before."""
        lo, hi = span
        with self.lock:
            self.writing.append(span)
        try:
            t = time.perf_counter()
            while True:
                with self.lock:
                    busy = any(a < hi and lo < b for a, b in self.storing)
                if not busy:
                    break
                await asyncio.sleep(_STORE_POLL_S)  # rare: a lane is storing these blocks
            self.stats.store_wait.add(time.perf_counter() - t)
            yield
        finally:
            with self.lock:
                self.writing.remove(span)

    def taken(self, b: int) -> bool:
        """Present, or a local write is under way on it (call under :attr:`lock`)."""
        if self.local.is_present(b):
            return True
        return any(lo <= b < hi for lo, hi in self.writing)

    def store(self, first: int, data: bytes | memoryview, *, lane: bool) -> int:
        """Store fetched blocks from ``first`` that are still missing; the count stored."""
        if not lane:  # on the owning loop: synchronous, nothing interleaves
            return self.local.fill_blocks(first, cast("bytes", data))
        bs = self.local.block_size
        n = -(-len(data) // bs)
        runs: list[Span] = []
        span = (first, first + n)
        with self.lock:  # decide and claim; the writes happen outside the lock
            i = 0
            while i < n:
                if self.taken(first + i):
                    i += 1
                    continue
                j = i + 1
                while j < n and not self.taken(first + j):
                    j += 1
                runs.append((i, j))
                i = j
            if not runs:
                return 0
            self.storing.append(span)  # a write to these blocks now waits for us
        stored = 0
        try:
            for i, j in runs:
                # fill_blocks takes any buffer (it wraps it in a memoryview).
                part = memoryview(data)[i * bs : j * bs]
                stored += self.local.fill_blocks(first + i, cast("bytes", part), direct=True)
        finally:
            with self.lock:
                self.storing.remove(span)
        return stored

    def store_zeroes(self, first: int, count: int) -> int:
        """Blocks the source holds as a hole: zero them here (no transfer), skipping taken
        ones. On the owning loop with no await, so nothing interleaves."""

        def busy(b: int) -> bool:  # a reader's fetch may have claimed it meanwhile
            return self.taken(b) or b in self.inflight

        stored = 0
        with self.lock:
            i = 0
            while i < count:
                if busy(first + i):
                    i += 1
                    continue
                j = i + 1
                while j < count and not busy(first + j):
                    j += 1
                stored += self.local.fill_zero_blocks(first + i, j - i)
                i = j
        return stored

"""The parts of a lazy volume that stand alone: settings, progress, the fill's rate
limit, the source protocol and its error (:mod:`edgevisor.storage.lazy` re-exports them)."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from edgevisor.errors import PeerUnavailable

__all__ = [
    "LazySettings",
    "Progress",
    "RemoteSource",
    "SourceLayout",
    "SourceUnavailable",
    "TokenBucket",
    "log_crash",
]

_log = logging.getLogger("edgevisor.storage.lazy")


class SourceUnavailable(PeerUnavailable):
    """The source did not answer within ``fetch_timeout_s``."""

    code = "source_unavailable"


class RemoteSource(Protocol):
    """What a lazy volume needs from its source (an :class:`NBDClient` fits).

    The ``connect`` callable given to :class:`LazyVolume` is also awaited on the fill
    lanes' own event loops (threads), so it must not touch objects bound to the caller's
    loop; a source may offer ``read_into(offset, buffer)`` for zero-copy fill reads.
    """

    @property
    def size_bytes(self) -> int: ...

    async def read(self, offset: int, length: int) -> bytes: ...

    async def write(self, offset: int, data: bytes, *, fua: bool = False) -> None: ...

    async def flush(self) -> None: ...

    async def aclose(self) -> None: ...


class LazySettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    fetch_timeout_s: float = Field(
        30.0,
        ge=0,
        description=(
            "How long a read, a synchronously mirrored write or a flush waits for an "
            "absent source before EIO."
        ),
    )
    reconnect_interval_s: float = Field(
        0.2, gt=0, description="Pause between attempts to reach an absent source."
    )
    fill_batch_blocks: int = Field(
        16, ge=1, le=512, description="Blocks per background fill request."
    )
    fill_inflight: int = Field(8, ge=1, le=256, description="Fill requests in flight at once.")
    fill_yield_inflight: int = Field(
        1,
        ge=0,
        le=256,
        description=(
            "Fill requests in flight while the volume serves a foreground write or flush "
            "(the domain's I/O goes first; the fill never stops). 0: the fill does not "
            "yield."
        ),
    )
    fill_yield_min_rate_bytes_per_s: int = Field(
        100_000_000,
        ge=0,
        description=(
            "The fill yields to foreground I/O only while it runs faster than this "
            "(measured over half-second windows), so a domain writing all the time slows "
            "the fill to about this rate at worst. 0: yield whatever the rate."
        ),
    )
    fill_connections: int = Field(
        2,
        ge=0,
        le=16,
        description=(
            "Connections to the source used only by the fill, each on its own thread "
            "(0: the fill shares the main connection on the owning loop)."
        ),
    )
    fill_rate_bytes_per_s: int = Field(
        0, ge=0, description="Background fill rate limit in bytes/s (0: unlimited)."
    )
    mirror: Literal["off", "async", "sync"] = Field(
        "sync", description="Mirror local writes to the source: off, async or sync."
    )
    flush_every_blocks: int = Field(
        1024, ge=1, description="Fill flushes data + present bits after this many blocks."
    )


@dataclass(frozen=True)
class Progress:
    bytes_present: int
    bytes_total: int
    rate_bytes_per_s: float
    eta_s: float | None

    @property
    def done(self) -> bool:
        return self.bytes_present >= self.bytes_total


class TokenBucket:
    """The fill's rate limit (``rate`` 0: unlimited); change it with :meth:`set_rate`,
    which also wakes a waiting :meth:`take` (a 1 MiB/s trickle would otherwise keep a
    batch asleep for up to a second after the limit was lifted)."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.tokens = float(rate)
        self.t = time.monotonic()
        self._changed: asyncio.Event | None = None  # created on the loop that waits

    def set_rate(self, rate: int) -> None:
        """New limit in bytes/s (0: unlimited); applies at once, also to a waiter."""
        self.rate = max(0, rate)
        self.tokens = min(self.tokens, float(self.rate))
        if self._changed is not None:
            self._changed.set()

    async def take(self, n: int) -> None:
        while True:
            if self.rate <= 0:  # re-read each time: the rate may change while waiting
                return
            now = time.monotonic()
            self.tokens = min(float(max(self.rate, n)), self.tokens + (now - self.t) * self.rate)
            self.t = now
            if self.tokens >= n:
                self.tokens -= n
                return
            if self._changed is None:
                self._changed = asyncio.Event()
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), (n - self.tokens) / self.rate)


class SourceLayout:
    """Which blocks read as zeroes at the source (pure bookkeeping), for every window of
    blocks learnt so far.

    :meth:`learn` takes the source's extents ``(offset, length, zero)`` for blocks
    ``[first, end)`` (replacing what was known there); :meth:`segments` then splits a run
    of blocks into ``(first, count, zero)`` pieces. Only whole blocks inside a zero extent
    count as zero (a block partly data is data), and whatever no learnt window covers is
    data: the fill may fetch more than needed, never skip a block that holds bytes.

    Why every window is kept, not only the last one: a read miss moves the fill's cursor
    (:mod:`edgevisor.storage.lazy`), so a domain reading here and there sends the fill
    back and forth between windows; asking the source again on each jump (one round trip
    the fill waits for) cost more than the transfer of a 1 GiB fill under random reads.
    The source's layout does not change under the fill after the release (only the
    target's mirrored writes reach it, and those blocks are present here already).
    """

    def __init__(self, block_size: int, size_bytes: int) -> None:
        self.bs = block_size
        self.size = size_bytes
        self.nblocks = -(-size_bytes // block_size)
        # Learnt runs (first, end, zero): sorted, disjoint; gaps are unknown (data).
        self.runs: list[tuple[int, int, bool]] = []
        self._starts: list[int] = []

    def covers(self, block: int) -> bool:
        i = bisect.bisect_right(self._starts, block) - 1
        return i >= 0 and self.runs[i][1] > block

    def learn(self, first: int, end: int, extents: list[tuple[int, int, bool]]) -> None:
        bs = self.bs
        zeros: list[tuple[int, int]] = []
        for off, n, zero in extents:
            if not zero:
                continue
            lo = -(-off // bs)
            e_end = off + n
            up = e_end // bs if e_end < self.size else self.nblocks  # the short last block
            lo, up = max(lo, first), min(up, end)
            if up > lo:
                zeros.append((lo, up))
        new: list[tuple[int, int, bool]] = []
        pos = first
        for lo, up in sorted(zeros):
            lo = max(lo, pos)
            if up <= lo:
                continue
            if lo > pos:
                new.append((pos, lo, False))
            new.append((lo, up, True))
            pos = up
        if pos < end:
            new.append((pos, end, False))
        kept: list[tuple[int, int, bool]] = []
        for lo, hi, zero in self.runs:  # what was known outside [first, end) stays
            if lo < first:
                kept.append((lo, min(hi, first), zero))
            if hi > end:
                kept.append((max(lo, end), hi, zero))
        self.runs = sorted(kept + new)
        self._starts = [r[0] for r in self.runs]

    def segments(self, first: int, count: int) -> list[tuple[int, int, bool]]:
        end = first + count
        out: list[tuple[int, int, bool]] = []

        def add(lo: int, hi: int, zero: bool) -> None:
            if out and out[-1][2] == zero:
                out[-1] = (out[-1][0], out[-1][1] + hi - lo, zero)
            else:
                out.append((lo, hi - lo, zero))

        b = first
        i = max(bisect.bisect_right(self._starts, first) - 1, 0)
        runs = self.runs
        while b < end and i < len(runs):
            lo, hi, zero = runs[i]
            i += 1
            if hi <= b:
                continue
            if lo >= end:
                break
            if lo > b:  # a gap nothing covers: data
                add(b, lo, False)
                b = lo
            seg_end = min(hi, end)
            add(b, seg_end, zero)
            b = seg_end
        if b < end:  # beyond what is known: data (asked about next time)
            add(b, end, False)
        return out


def log_crash(task: asyncio.Task[None]) -> None:
    """Done callback of a background task: log how it died, if it did."""
    if not task.cancelled() and task.exception() is not None:
        _log.error("lazy volume background task died", exc_info=task.exception())

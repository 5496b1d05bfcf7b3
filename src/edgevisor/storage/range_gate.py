"""Per-range write barriers for a mirrored volume (exact copy comparison under writes).

A lazy volume mirrors each local write to its source: the write is *in flight* from the
moment it enters the volume until the source took it (sync mirror) or, with the async
mirror, until the queued copy was delivered. Comparing the two copies of a range while a
write to it is in flight may see the new bytes on one side only, so a comparison that
merely retries is lucky, not exact: a range written continuously can differ at every look.

:class:`RangeGate` makes it exact. A *barrier* on ``[lo, hi)`` first stops new writes that
overlap it (they wait at :meth:`RangeGate.enter`), then waits until the overlapping writes
already in flight have left; while the barrier is held nothing writes the range on either
copy, so both reads see one state and a difference is a real one. Writes to other ranges
never wait. A barrier is held for the time of two reads (a few ms per MiB), and waiting
for writes in flight is bounded by the caller's timeout.

Theory of operation: writes register (``enter``) only while no barrier overlaps them; a
barrier registers first and then waits for the overlapping registrations to drop to none.
Nothing a barrier waits for can itself be waiting for that barrier (an entered write no
longer consults barriers), so a barrier cannot deadlock with writes, and new writes cannot
starve it. Everything runs on the owning event loop; ``leave`` is synchronous so it can be
called from ``finally`` blocks and callbacks.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Callable, Iterable

__all__ = ["RangeGate", "RangeOrder"]


def _overlaps(spans: Iterable[tuple[int, int]], lo: int, hi: int) -> bool:
    return any(a < hi and lo < b for a, b in spans)


class RangeGate:
    """Writes in flight by byte range, and barriers that wait for them (module docstring)."""

    def __init__(self) -> None:
        self._writes: dict[int, tuple[int, int]] = {}
        self._barriers: list[tuple[int, int]] = []
        self._waiters: list[asyncio.Future[None]] = []
        self._ids = itertools.count(1)

    @property
    def writes_in_flight(self) -> int:
        return len(self._writes)

    def try_enter(self, lo: int, hi: int) -> int | None:
        """Register a write of ``[lo, hi)`` now, or None if a barrier covers part of it."""
        if self._barriers and _overlaps(self._barriers, lo, hi):
            return None
        token = next(self._ids)
        self._writes[token] = (lo, hi)
        return token

    async def enter(self, lo: int, hi: int) -> int:
        """Register a write of ``[lo, hi)``, first waiting out barriers that overlap it;
        returns the token for :meth:`leave`. No await when no barrier is held (hot path)."""
        while True:
            token = self.try_enter(lo, hi)
            if token is not None:
                return token
            await self._changed()

    def leave(self, token: int) -> None:
        """The write is complete on both copies (or failed); idempotent."""
        if self._writes.pop(token, None) is not None and self._barriers:
            self._wake()

    @contextlib.asynccontextmanager
    async def writing(self, lo: int, hi: int) -> AsyncIterator[None]:
        token = await self.enter(lo, hi)
        try:
            yield
        finally:
            self.leave(token)

    @contextlib.asynccontextmanager
    async def barrier(self, lo: int, hi: int, timeout_s: float) -> AsyncIterator[None]:
        """Hold ``[lo, hi)`` free of writes: new ones wait, ones in flight finish first
        (raises TimeoutError if they do not within ``timeout_s``)."""
        span = (lo, hi)
        self._barriers.append(span)
        try:
            await asyncio.wait_for(
                self._until(lambda: not _overlaps(self._writes.values(), lo, hi)), timeout_s
            )
            yield
        finally:
            self._barriers.remove(span)
            self._wake()

    async def _until(self, cond: Callable[[], bool]) -> None:
        while not cond():
            await self._changed()

    async def _changed(self) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(fut)

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for f in waiters:
            if not f.done():
                f.set_result(None)


class RangeOrder:
    """Overlapping operations one at a time; others at once. A lazy volume runs a
    sync-mirrored write's local part and its mirror at the same time: two overlapping
    writes could then reach the two copies in different orders (and leave them
    different), unless one waits here until the other is done on both. Which of two
    concurrent writes goes first is not promised (a block device promises none either);
    only that both copies see the same one first. A waiter is not queued: it enters once
    nothing overlapping is held (fine for a block device's writes, which rarely overlap
    while in flight)."""

    def __init__(self) -> None:
        self._held: dict[int, tuple[int, int, asyncio.Future[None]]] = {}
        self._ids = itertools.count(1)

    def __len__(self) -> int:
        return len(self._held)

    @contextlib.asynccontextmanager
    async def hold(self, lo: int, hi: int) -> AsyncIterator[None]:
        """Run the body once no overlapping holder is left, holding the range."""
        while True:
            busy = [f for a, b, f in self._held.values() if a < hi and lo < b]
            if not busy:
                break
            await asyncio.wait(busy)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        key = next(self._ids)
        self._held[key] = (lo, hi, fut)
        try:
            yield
        finally:
            del self._held[key]
            fut.set_result(None)

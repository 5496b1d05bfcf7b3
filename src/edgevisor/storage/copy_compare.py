"""Exact comparison of a mirrored volume's two copies (a migration's verify and resync).

Each range is compared under the local device's ``write_barrier`` (see
:mod:`edgevisor.storage.range_gate`) when it has one: no write to the range is in flight
on either copy while both are read, so the comparison needs no retries and a difference
is a real one (a block the mirror never delivered, or a corrupted copy). A device without
a barrier (nothing mirrors to the peer) is compared as it is.

Ranges are read one after the other (the barrier is held for one range's two reads, a
few ms per MiB); the next range's remote read is not started early, so a barrier never
waits for bytes that are not part of its comparison.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol

from edgevisor.storage.blockdev import BlockDevice

__all__ = ["CompareResult", "RemoteCopy", "barrier_of", "compare_copies", "push_differences"]

CHUNK = 1 << 20

Barrier = Callable[[int, int], AbstractAsyncContextManager[None]]


class RemoteCopy(Protocol):
    """The peer's copy (e.g. :class:`~edgevisor.storage.nbd_client.NBDClient`)."""

    async def read(self, offset: int, length: int) -> bytes: ...

    async def write(self, offset: int, data: bytes, *, fua: bool = False) -> None: ...


@dataclass(frozen=True)
class CompareResult:
    """``sha256`` of the local copy as compared; ``mismatch`` = first differing range."""

    sha256: str
    mismatch: tuple[int, int] | None


def barrier_of(dev: object) -> Barrier | None:
    """The device's ``write_barrier``, looking through a forwarding reference
    (``.target``) such as the agent's swappable device; None if it has none."""
    for d in (dev, getattr(dev, "target", None)):
        fn = getattr(d, "write_barrier", None)
        if fn is not None:
            return fn  # type: ignore[no-any-return]
    return None


def _held(barrier: Barrier | None, off: int, n: int) -> AbstractAsyncContextManager[None]:
    return barrier(off, n) if barrier is not None else contextlib.nullcontext()


async def compare_copies(
    local: BlockDevice, remote: RemoteCopy, *, chunk: int = CHUNK
) -> CompareResult:
    """Compare every range of ``local`` with ``remote``; stops at the first difference."""
    barrier = barrier_of(local)
    h = hashlib.sha256()
    size = local.size_bytes
    for off in range(0, size, chunk):
        n = min(chunk, size - off)
        async with _held(barrier, off, n):
            mine, theirs = await asyncio.gather(local.read(off, n), remote.read(off, n))
        if mine != theirs:
            return CompareResult(h.hexdigest(), (off, n))
        h.update(mine)
    return CompareResult(h.hexdigest(), None)


async def push_differences(
    local: BlockDevice, remote: RemoteCopy, *, present_only: bool = True, chunk: int = CHUNK
) -> int:
    """Make ``remote`` hold ``local``'s bytes wherever they differ (only in present
    blocks when ``present_only``: a missing block was never written here, so the peer's
    is the right one). Each range is compared and pushed under the barrier, so a push
    never overwrites a newer mirrored write. Returns the bytes pushed."""
    barrier = barrier_of(local)
    pushed = 0
    size = local.size_bytes
    for base in range(0, size, chunk):
        span = min(chunk, size - base)
        runs = local.present(base, span) if present_only else [(base, span, True)]
        for off, n, here in runs:
            if not here or n <= 0:
                continue
            async with _held(barrier, off, n):
                mine, theirs = await asyncio.gather(local.read(off, n), remote.read(off, n))
                if mine != theirs:
                    await remote.write(off, mine)
                    pushed += n
    return pushed

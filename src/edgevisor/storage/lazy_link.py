"""The main link of a :class:`~edgevisor.storage.lazy.LazyVolume` to its source (split
out of it): the connection read misses, block status and mirrored writes use, opened on
demand and reopened after a failure, and the mirroring of local writes over it.

* **connection**: one at a time (``_conn_lock``); a call that fails with
  :class:`~edgevisor.errors.PeerUnavailable` drops it and retries on a new one every
  ``reconnect_interval_s`` until its deadline, then fails with
  :class:`~edgevisor.storage.lazy_parts.SourceUnavailable`.
* **mirroring** (:func:`write`): ``sync`` sends each write (with the caller's FUA) while
  the local copy is written, and acknowledges it when both have it; ``async`` queues it
  (in order) for :func:`mirror_loop`, which retries until the source takes it. Either
  way the write stays *in flight* for the volume's write barrier until the source has it
  (:mod:`edgevisor.storage.range_gate`). While the volume detaches, a sync mirror that
  cannot reach the source completes locally.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

from edgevisor.errors import PeerUnavailable
from edgevisor.storage.lazy_parts import RemoteSource, SourceUnavailable

if TYPE_CHECKING:
    from edgevisor.storage.lazy import LazyVolume

__all__ = ["drop_source", "get_source", "mirror", "mirror_loop", "on_source", "write"]

log = logging.getLogger("edgevisor.storage.lazy")
T = TypeVar("T")
_SMALL = 64 * 1024  # writes counted in MirrorStats.mirror_small


async def get_source(v: LazyVolume, deadline: float) -> RemoteSource:
    while True:
        if v._closed:
            raise SourceUnavailable("the lazy volume's source link is closed")
        if v._source is not None:
            return v._source
        async with v._conn_lock:
            if v._source is not None:
                return v._source
            try:
                src = await v._connect()
            except (PeerUnavailable, OSError) as e:
                if time.monotonic() >= deadline:
                    raise SourceUnavailable(f"volume source unreachable: {e}") from e
            else:
                if v._closed:  # closed while connecting: do not leak it
                    with contextlib.suppress(Exception):
                        await src.aclose()
                    continue
                v._source = src
                return src
        await asyncio.sleep(v.settings.reconnect_interval_s)


async def drop_source(v: LazyVolume, src: RemoteSource) -> None:
    if v._source is src:
        v._source = None
        with contextlib.suppress(Exception):
            await src.aclose()


async def on_source(
    v: LazyVolume, what: str, fn: Callable[[RemoteSource], Awaitable[T]], deadline: float
) -> T:
    """``fn(source)`` on the main connection, reconnecting until ``deadline``."""
    while True:
        src = await get_source(v, deadline)
        try:
            return await fn(src)
        except SourceUnavailable:
            raise
        except PeerUnavailable as e:
            await drop_source(v, src)
            if time.monotonic() >= deadline or v._closed:
                raise SourceUnavailable(f"{what}: {e}") from e
            await asyncio.sleep(v.settings.reconnect_interval_s)


async def write(
    v: LazyVolume,
    offset: int,
    length: int,
    local: Callable[[], Awaitable[None]],
    data: bytes | None,
    fua: bool,
) -> None:
    """A write on both copies: ``local()`` writes the local copy, ``data`` (None: zeroes)
    goes to the source. Partially covered missing blocks are fetched (merged) first. Sync
    mirror: then the source's round trip runs *during* the local ``pwrite``, not after
    it, and the call returns when both are done, so the wait is the longer of the two,
    not their sum (a local write that fails after the source took it leaves the range
    different on the copies, as a failed write may; the caller got an error).
    Overlapping sync writes run one after the other (:class:`RangeOrder`): both copies
    see them in the same order."""
    st = v.stats
    t0 = st.write_started(length)
    v._foreground += 1
    queued = False
    token: int | None = None
    try:
        # In flight (for write_barrier) until the source took it; see mirror() for async.
        token = await v._gate.enter(offset, offset + length)
        with v._op() as linked:
            if linked:
                await v._released.wait()  # never mirror to a source still in use
            if linked:
                await _prepare(v, offset, length)
            if linked and v.settings.mirror == "sync":
                async with v._order.hold(offset, offset + length):
                    got = await asyncio.gather(
                        _write_local(v, offset, length, local),
                        _mirror_timed(v, offset, length, data, fua, token),
                        return_exceptions=True,
                    )
                for r in got:
                    if isinstance(r, BaseException):
                        raise r
            else:
                await _write_local(v, offset, length, local)
                if linked:
                    queued = await _mirror_timed(v, offset, length, data, fua, token)
    finally:
        v._foreground -= 1
        st.write_ended(t0)
        if not queued and token is not None:
            v._gate.leave(token)


async def _prepare(v: LazyVolume, offset: int, length: int) -> None:
    """Fetch partially covered missing blocks first, before either copy is written: a
    failed fetch (source away) then leaves both copies as they were."""
    t = time.perf_counter()
    await v._prepare_write(offset, length)
    v.stats.prepare.add(time.perf_counter() - t)


async def _write_local(
    v: LazyVolume, offset: int, length: int, local: Callable[[], Awaitable[None]]
) -> None:
    t = time.perf_counter()
    async with v._writing_span(offset, length):
        await local()
    v.stats.local.add(time.perf_counter() - t)


async def _mirror_timed(
    v: LazyVolume, offset: int, length: int, data: bytes | None, fua: bool, token: int
) -> bool:
    t = time.perf_counter()
    queued = await mirror(v, offset, bytes(length) if data is None else data, fua, token)
    t = time.perf_counter() - t
    v.stats.mirror.add(t)
    if length <= _SMALL:
        v.stats.mirror_small.add(t)
    return queued


async def mirror(v: LazyVolume, offset: int, data: bytes, fua: bool, token: int) -> bool:
    """Mirror one write; True if queued (async: the mirror loop ends its ``token``)."""
    mode = v.settings.mirror
    if mode == "off":
        return False
    if mode == "async":
        v._mirror_q.put_nowait((offset, data, token))
        return True
    deadline = time.monotonic() + v.settings.fetch_timeout_s

    async def write(src: RemoteSource) -> None:
        await src.write(offset, data, fua=fua)

    try:
        await on_source(v, "mirror write failed", write, deadline)
    except SourceUnavailable:
        if not v._detaching:
            raise
        # Detaching: the source copy is being released; the write is durable here.
        log.warning("lazy volume: a write at %d did not reach the source at detach", offset)
    return False


async def mirror_loop(v: LazyVolume) -> None:
    while True:
        offset, data, token = await v._mirror_q.get()
        try:
            while True:
                try:
                    src = await get_source(v, time.monotonic() + 3600)
                    await src.write(offset, data)
                    break
                except PeerUnavailable:
                    if v._source is not None:
                        await drop_source(v, v._source)
                    await asyncio.sleep(v.settings.reconnect_interval_s)
        finally:
            v._gate.leave(token)
            v._mirror_q.task_done()

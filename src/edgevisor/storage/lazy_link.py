"""The main link of a :class:`~edgevisor.storage.lazy.LazyVolume` to its source (split
out of it): the connection read misses, block status and mirrored writes use, opened on
demand and reopened after a failure, and the mirroring of local writes over it.

* **connection**: one at a time (``_conn_lock``); a call that fails with
  :class:`~edgevisor.errors.PeerUnavailable` drops it and retries on a new one every
  ``reconnect_interval_s`` until its deadline, then fails with
  :class:`~edgevisor.storage.lazy_parts.SourceUnavailable`.
* **mirroring**: ``sync`` sends each write (with the caller's FUA) before the local write
  is acknowledged; ``async`` queues it (in order) for :func:`mirror_loop`, which retries
  until the source takes it. Either way the write stays *in flight* for the volume's
  write barrier until the source has it (:mod:`edgevisor.storage.range_gate`). While
  the volume detaches, a sync mirror that cannot reach the source completes locally.
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

__all__ = ["drop_source", "get_source", "mirror", "mirror_loop", "on_source"]

log = logging.getLogger("edgevisor.storage.lazy")
T = TypeVar("T")


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

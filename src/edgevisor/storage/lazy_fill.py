"""The background fill of a :class:`~edgevisor.storage.lazy.LazyVolume` (split out of it).

Runs of missing blocks (``fill_batch_blocks`` per request, ``fill_inflight`` requests in
flight, ``fill_yield_inflight`` while a foreground write or flush is under way) are
fetched from the cursor on under the volume's token-bucket rate limit, over
``fill_connections`` connections of their own, each on its own thread
(:mod:`edgevisor.storage.lazy_lane`; blocking sockets when the source tells its
``endpoint``); their connections are opened as soon as the fill task starts, so a
volume created *held* ahead of a switch has its handshakes (TCP, NBD, TLS) done before
the release. Runs the source reports as holes (``base:allocation`` block status, asked
once per window of ``_STATUS_WINDOW_BLOCKS`` and remembered, the next window asked in
the background) are not transferred: they are zeroed here and marked present. A
background ``fdatasync`` every ``flush_every_blocks`` makes fetched blocks durable while
the fill goes on; the fill ends with a final flush, sets the volume's ``filled`` event
and then closes its lanes.

These functions work on the volume's state and follow its theory of operation (claims
are registered synchronously with the decision to fetch, rule 1 in
:mod:`edgevisor.storage.lazy`); they are only called by the volume.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from typing import TYPE_CHECKING

from edgevisor.errors import PeerUnavailable
from edgevisor.proto.nbd_wire import STATE_ZERO
from edgevisor.storage import lazy_link
from edgevisor.storage.lazy_lane import FillLanes
from edgevisor.storage.lazy_parts import RemoteSource, log_crash
from edgevisor.storage.nbd_client import Endpoint, NBDCommandError

if TYPE_CHECKING:
    from edgevisor.storage.lazy import LazyVolume

__all__ = ["next_runs", "open_lanes", "run", "source_layout"]

log = logging.getLogger(__name__)

_RATE_WINDOW_S = 0.5
"""Window of the fill-rate measure behind ``fill_yield_min_rate_bytes_per_s``."""
_STATUS_WAIT_S = 2.0
"""How long the fill waits for the source's block status before fetching blindly."""
_STATUS_WINDOW_BLOCKS = 4096
"""Blocks per ``base:allocation`` question to the source (256 MiB of 64 KiB blocks)."""


class _NoStatus(Exception):
    """The source offers no block status."""


def next_runs(v: LazyVolume, limit: int) -> list[tuple[int, int]]:
    """Up to ``limit`` runs of missing, not-in-flight blocks from the cursor on
    (wrapping around). Present stretches are skipped a byte of the bitmap at a time:
    near the end of a fill, when the few missing blocks are all in flight, a walk
    block by block would cross the whole volume on every call."""
    local = v.local
    n = local.nblocks
    batch = v.settings.fill_batch_blocks
    inflight = v._inflight
    out: list[tuple[int, int]] = []
    start = v._cursor % max(n, 1)
    for lo, hi in ((start, n), (0, start)):
        b = lo
        while b < hi and len(out) < limit:
            b = local.next_missing(b, hi)
            if b >= hi:
                break
            if b in inflight:
                b += 1
                continue
            end = min(local.next_present(b, min(hi, b + batch)), hi)
            e = b + 1
            while e < end and e not in inflight:
                e += 1
            out.append((b, e - b))
            b = e
            v._cursor = e
        if len(out) >= limit:
            break
    return out


def _inflight_limit(v: LazyVolume) -> int:
    """Fill requests allowed in flight now: fewer while a foreground write or flush is
    under way (``fill_yield_inflight``), so the domain's I/O does not queue behind the
    fill for the CPU, the disk and the source; but only while the fill runs faster than
    ``fill_yield_min_rate_bytes_per_s`` (DRBD's resync throttle and ``c-min-rate``)."""
    s = v.settings
    if (
        v._foreground
        and s.fill_yield_inflight
        and _fill_rate(v) >= s.fill_yield_min_rate_bytes_per_s
    ):
        return min(s.fill_inflight, s.fill_yield_inflight)
    return s.fill_inflight


def _fill_rate(v: LazyVolume) -> float:
    """Bytes/s the volume became present at over the last full window (inf before the
    first one ends)."""
    now = time.monotonic()
    t0, present0 = v._fill_window
    if now - t0 >= _RATE_WINDOW_S:
        present = v.local.present_blocks
        v._fill_rate = (present - present0) * v.local.block_size / (now - t0)
        v._fill_window = (now, present)
    return v._fill_rate


async def run(v: LazyVolume) -> None:
    inflight: set[asyncio.Task[None]] = set()
    bs = v.local.block_size
    if v._lanes is None:
        v._lanes = await open_lanes(v)
        if v._lanes is not None:
            v._lanes.connect_soon()
    await v._released.wait()  # connected while held: ready at the release
    try:
        while True:
            while len(inflight) < _inflight_limit(v):
                runs = next_runs(v, 1)
                if not runs:
                    break
                for first, count, zero in await source_layout(v, *runs[0]):
                    if zero:  # a hole at the source: nothing to transfer
                        v._since_flush += v._store_zeroes(first, count)
                        continue
                    await v._bucket.take(count * bs)
                    blocks = range(first, first + count)
                    if any(v.local.is_present(b) or b in v._inflight for b in blocks):
                        continue  # a reader got there during the waits
                    futs = v._register(first, count)  # before any await (rule 1)
                    deadline = time.monotonic() + v.settings.fetch_timeout_s
                    t = asyncio.create_task(
                        v._fetch_run(first, count, futs, deadline, lanes=v._lanes)
                    )
                    inflight.add(t)
            if not inflight:
                if not v.local.missing_blocks():
                    if v._flush_task is not None:
                        await v._flush_task
                    await v.local.flush()
                    # Filled once durable; closing the lanes (joining their threads) is
                    # no part of the fill's time.
                    v.filled.set()
                    await v._close_lanes()
                    return
                await asyncio.sleep(v.settings.reconnect_interval_s)
                continue
            done, inflight = await asyncio.wait(inflight, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t.exception() is not None:  # source away: keep trying, slower
                    log.info("lazy fill: %s", t.exception())
                    await asyncio.sleep(v.settings.reconnect_interval_s)
            if v._since_flush >= v.settings.flush_every_blocks and (
                v._flush_task is None or v._flush_task.done()
            ):
                # In the background: the fill keeps fetching while the disk catches up.
                v._since_flush = 0
                v._flush_task = asyncio.create_task(v.local.flush())
                v._flush_task.add_done_callback(log_crash)
    finally:
        _stop_asks(v)
        for t in inflight:
            t.cancel()
        # Let cancelled fetches finish their stores before the lanes are closed.
        await asyncio.gather(*inflight, return_exceptions=True)


async def source_layout(v: LazyVolume, first: int, count: int) -> list[tuple[int, int, bool]]:
    """``[first, first + count)`` split into ``(first, count, zero)`` segments by the
    source's allocation (``base:allocation`` block status, asked once per window of
    ``_STATUS_WINDOW_BLOCKS``); all data when the source cannot tell. The next window's
    status is asked in the background meanwhile, so the fill does not wait for it when
    it gets there."""
    if v._status_ok:
        w = first // _STATUS_WINDOW_BLOCKS
        if not v._layout.covers(first):
            await _ask_window(v, w)
        nxt = (w + 1) * _STATUS_WINDOW_BLOCKS
        if nxt < v.local.nblocks and v._status_ok and not v._layout.covers(nxt):
            _ask_window(v, w + 1)
    return v._layout.segments(first, count)


def _ask_window(v: LazyVolume, w: int) -> asyncio.Task[None]:
    """The ask for window ``w`` under way, or a new one: one question at a time."""
    t = v._status_asks.get(w)
    if t is None or t.done():
        t = v._status_asks[w] = asyncio.create_task(ask_status(v, w * _STATUS_WINDOW_BLOCKS))
        t.add_done_callback(log_crash)
    return t


def _stop_asks(v: LazyVolume) -> None:
    for t in v._status_asks.values():
        t.cancel()
    v._status_asks.clear()


async def ask_status(v: LazyVolume, block: int) -> None:
    """Learn the source's layout of the (aligned) window holding ``block``; the layout
    keeps every window learnt, so the source is asked once per window."""
    bs = v.local.block_size
    first = block - block % _STATUS_WINDOW_BLOCKS
    hi = min(v.local.nblocks, first + _STATUS_WINDOW_BLOCKS)
    off, length = first * bs, min(hi * bs, v.size_bytes) - first * bs
    # Short: with the source away the fetches below wait (and retry) anyway.
    deadline = time.monotonic() + min(v.settings.fetch_timeout_s, _STATUS_WAIT_S)

    async def ask(src: RemoteSource) -> list[tuple[int, int, int]]:
        fn = getattr(src, "block_status", None)
        if fn is None:
            raise _NoStatus
        res: list[tuple[int, int, int]] = await fn(off, length)
        return res

    try:
        extents = await lazy_link.on_source(v, "block status", ask, deadline)
    except (_NoStatus, NBDCommandError):
        v._status_ok = False  # this source cannot tell: fetch everything
        return
    except PeerUnavailable as e:  # unknown for now: these blocks are fetched
        log.info("lazy fill: no block status from the source: %s", e)
        return
    v._layout.learn(first, hi, [(o, n, bool(f & STATE_ZERO)) for o, n, f in extents])


async def open_lanes(v: LazyVolume) -> FillLanes | None:
    """Blocking lanes when the source says where it is (``endpoint``), else lanes
    with an event loop of their own that call ``connect`` there."""
    n = v.settings.fill_connections
    if n == 0:
        return None
    endpoint = None
    deadline = time.monotonic() + v.settings.fetch_timeout_s
    with contextlib.suppress(PeerUnavailable):  # no fill without the source anyway
        endpoint = getattr(await lazy_link.get_source(v, deadline), "endpoint", None)
    return FillLanes(
        n,
        endpoint if isinstance(endpoint, Endpoint) else None,
        v._connect,
        functools.partial(v._store, lane=True),
        block_size=v.local.block_size,
        buffer_bytes=v.settings.fill_batch_blocks * v.local.block_size,
        reconnect_interval_s=v.settings.reconnect_interval_s,
    )

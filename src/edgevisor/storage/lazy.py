"""A lazy volume: a local Volume whose missing blocks come from a remote source on demand.

Used on a migration target after the switch. It is a
:class:`~edgevisor.storage.blockdev.BlockDevice`:

* **read**: missing blocks in the range are fetched from the source first (whole blocks,
  in one request per contiguous run), stored locally and marked present, then the bytes
  are read locally. A read miss is fetched at once on the main connection, ahead of the
  background fill, and moves the fill's cursor to the block after it (reads tend to
  continue).
* **write**: a partially covered missing block is fetched and merged first. Mirroring to
  the source: ``off``, ``async`` (queued in order, sent in the background, retried until
  the source takes them) or ``sync`` (acknowledged only after the source took the write,
  with FUA when the caller asked for it; the source's round trip runs while the local
  copy is written, and overlapping sync writes go one after the other so both copies see
  them in one order: :func:`edgevisor.storage.lazy_link.write`). Where writes and
  flushes spend their time is counted in :attr:`LazyVolume.stats`
  (:mod:`edgevisor.storage.mirror_stats`).
* **background fill**: runs of missing blocks (``fill_batch_blocks`` per request,
  ``fill_inflight`` requests in flight, only ``fill_yield_inflight`` while a foreground
  write or flush is under way and the fill runs above ``fill_yield_min_rate_bytes_per_s``)
  under a token-bucket rate limit, spread over
  ``fill_connections`` connections of their own, each on its own thread
  (:mod:`edgevisor.storage.lazy_lane`; blocking sockets when the source tells its
  ``endpoint``): a read miss never queues behind fill traffic, and ``recv_into``, TLS
  decryption and ``pwrite`` (which release the GIL) use several cores. Replies land
  straight in buffers and are stored off the loop (:mod:`edgevisor.storage.lazy_fill`
  has the details); a background ``fdatasync``
  every ``flush_every_blocks`` makes them durable (present bits are journaled after it)
  while the fill goes on. Progress (bytes present / total, rate, ETA) never goes
  backwards: present blocks never become missing. Two cheap paths: lanes store with
  ``O_DIRECT`` from page-aligned buffers (no page-cache copy of bytes nobody reads
  soon), and runs the source reports as holes (``base:allocation`` block status, asked
  per 256 MiB window) are not transferred at all: they are deallocated here and marked
  present (the store follows the same rules as a fetched one).
* **source outage**: a fetch, a synchronously mirrored write and a flush wait up to
  ``fetch_timeout_s`` for the source to come back (reconnecting every
  ``reconnect_interval_s``) and then fail with :class:`SourceUnavailable` (served as EIO
  over NBD); the fill keeps retrying and resumes by itself when the source returns.
* **detach** (:meth:`LazyVolume.detach`, also what :meth:`LazyVolume.aclose` does once the
  fill ended): the link is quiesced before it is closed, so no I/O in flight fails.

Theory of operation (why fetched bytes can never overwrite a newer local write)
------------------------------------------------------------------------------
A block's fetched content may be stored only while the block is missing; a local write
makes the blocks it covers present. Three rules keep "still missing?" and the store one
step with respect to writes:

1. Every fetch registers its blocks in ``_inflight`` *synchronously*, in the same step as
   the decision to fetch them (never later, in a task that has not started yet), and never
   over another fetch's registration. So no block is fetched twice at once, and a reader
   finds the fetch to wait for.
2. A store on a lane thread decides under a lock which blocks to write (those neither
   present nor named by a local write) and claims them in the same step; it writes them
   outside the lock (a lock held across a 1 MiB ``O_DIRECT`` write would stall the loop)
   and drops the claim when done. A local write names its blocks (under the lock) and
   then waits until no store claim overlaps them, before touching the data file; the
   name stays until its present bits are set. A store is therefore entirely before the
   write's data (the write wins) or sees the block taken (and skips it). Both sides:
   :class:`~edgevisor.storage.lazy_store.StoreClaims`.
3. Stores on the owning loop are synchronous (check, ``pwrite``, mark), as is a write's
   ``pwrite``-and-mark, so they cannot interleave either.

States of the link: *attached* (fetches and mirrored writes use the source) →
*detaching* (no new work goes to the source; what is in flight finishes, riding out
reconnects) → *detached* (purely local; the source connection is closed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from typing import TypeVar

from edgevisor.errors import Conflict, PeerUnavailable
from edgevisor.storage import lazy_fill, lazy_link
from edgevisor.storage.lazy_lane import FillLanes
from edgevisor.storage.lazy_parts import (
    LazySettings,
    Progress,
    RemoteSource,
    SourceLayout,
    SourceUnavailable,
    TokenBucket,
    log_crash,
)
from edgevisor.storage.lazy_store import StoreClaims
from edgevisor.storage.mirror_stats import MirrorStats
from edgevisor.storage.range_gate import RangeGate, RangeOrder
from edgevisor.storage.volume import Volume

__all__ = ["LazySettings", "LazyVolume", "Progress", "RemoteSource", "SourceUnavailable"]

log = logging.getLogger(__name__)
T = TypeVar("T")
_DETACH_GRACE_S = 5.0
"""Extra time (over ``fetch_timeout_s``) detach gives I/O in flight before closing."""


_Futures = dict[int, "asyncio.Future[None]"]


class LazyVolume:
    """See the module docstring."""

    def __init__(
        self,
        local: Volume,
        connect: Callable[[], Awaitable[RemoteSource]],
        settings: LazySettings | None = None,
        *,
        held: bool = False,
    ) -> None:
        self.local = local
        self.settings = settings or LazySettings()
        self._connect = connect
        self._source: RemoteSource | None = None  # main connection: read misses, mirroring
        self._conn_lock = asyncio.Lock()
        self._lanes: FillLanes | None = None  # the fill's connections, on threads of their own
        self._lane_closers: set[FillLanes] = set()
        self._flush_task: asyncio.Task[None] | None = None
        self._inflight: _Futures = {}
        self._order = RangeOrder()  # overlapping sync writes, one after the other
        self._gate = RangeGate()  # writes in flight by byte range, for write_barrier
        self._cursor = 0
        self._bucket = TokenBucket(self.settings.fill_rate_bytes_per_s)
        self._fill_task: asyncio.Task[None] | None = None
        self._layout = SourceLayout(local.block_size, local.size_bytes)  # holes at the source
        self._status_ok = True
        self._status_asks: dict[int, asyncio.Task[None]] = {}  # window -> ask under way
        self._mirror_q: asyncio.Queue[tuple[int, bytes, int]] = asyncio.Queue()
        self._mirror_task: asyncio.Task[None] | None = None
        self._since_flush = 0
        self._foreground = 0  # foreground writes and flushes under way (the fill yields)
        self._fill_window = (time.monotonic(), local.present_blocks)  # lazy_fill._fill_rate
        self._fill_rate = math.inf
        self.stats = MirrorStats()  # where foreground writes and flushes spend their time
        self._claims = StoreClaims(local, self._inflight, self.stats)  # rule 2
        self._ops = 0  # BlockDevice calls in flight that may use the source
        self._idle = asyncio.Event()
        self._idle.set()
        self._detaching = False
        self._detached = False
        self._closed = False  # no (re)connects any more
        self.filled = asyncio.Event()
        # Switch hold (added for the migration switch; see ``release``): a volume created
        # ahead of a switch takes no byte from its source until released.
        self._released = asyncio.Event()
        if not held:
            self._released.set()
        self._t0 = time.monotonic()
        self._present0 = local.present_blocks
        if not local.missing_blocks():
            self.filled.set()

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the background fill (and the async mirror, if configured)."""
        if self._detaching or self._closed:
            return
        if self._fill_task is None and not self.filled.is_set():
            self._fill_task = asyncio.create_task(lazy_fill.run(self))
            self._fill_task.add_done_callback(log_crash)
        if self.settings.mirror == "async" and self._mirror_task is None:
            self._mirror_task = asyncio.create_task(
                lazy_link.mirror_loop(
                    self,
                )
            )
            self._mirror_task.add_done_callback(log_crash)

    def release(self) -> None:
        """End the hold of a volume created ``held``: from now on the source's data is
        final (a migration's source stopped). Until then the fill, read misses and writes
        wait (nothing is fetched or mirrored); a flush passes. Idempotent."""
        if not self._released.is_set():
            self._t0 = time.monotonic()  # the fill's rate counts from here
            # The time held earns the fill no burst: right after a switch, the mount's
            # and the starting domain's read misses get the link first.
            self._bucket.tokens, self._bucket.t = 0.0, self._t0
            self._released.set()

    @property
    def held(self) -> bool:
        return not self._released.is_set()

    @property
    def detached(self) -> bool:
        """True once the source link is closed and every I/O is purely local."""
        return self._detached

    async def detach(self) -> None:
        """Quiesce the link to the source, then close it; the volume is purely local after.

        Only when every block is present (else :class:`~edgevisor.errors.Conflict`), and
        only once the source copy need not follow any more (a migration's commit): from
        the call on, new writes are not mirrored. The fill is stopped; reads, mirrored
        writes and flushes already in flight finish first, riding out a reconnect within
        ``fetch_timeout_s`` (one that still cannot reach the source then completes
        locally instead of failing: the source is being released); async-mirrored writes
        are drained as far as the source takes them in that time. Idempotent.
        """
        if self._detached:
            return
        if not self.filled.is_set():
            p = self.progress()
            raise Conflict(
                f"lazy volume still filling ({p.bytes_present}/{p.bytes_total} bytes)",
                details={"bytes_present": p.bytes_present, "bytes_total": p.bytes_total},
            )
        self._detaching = True
        bound = self.settings.fetch_timeout_s + _DETACH_GRACE_S
        await self._stop_fill()
        if self._mirror_task is not None:
            try:
                await asyncio.wait_for(self._mirror_q.join(), bound)
            except TimeoutError:
                log.warning("lazy volume: %d async mirror writes dropped at detach",
                            self._mirror_q.qsize())  # fmt: skip
        try:
            await asyncio.wait_for(self._idle.wait(), bound)
        except TimeoutError:
            log.warning("lazy volume: %d I/O still in flight at detach", self._ops)
        self._detached = True
        await self._close_links()

    async def aclose(self) -> None:
        """Release the source and stop background work (a filled volume detaches first,
        so no I/O in flight fails); the local volume stays open."""
        if self.filled.is_set() and not self._detached and not self._closed:
            try:
                await self.detach()
            except Exception:
                log.exception("lazy volume: detach failed; closing the link")
        await self._stop_fill()
        await self._close_links()
        await self.local.flush()

    async def _stop_fill(self) -> None:
        t, self._fill_task = self._fill_task, None
        if t is not None:
            t.cancel()
            with contextlib.suppress(BaseException):
                await t
        f, self._flush_task = self._flush_task, None
        if f is not None:
            with contextlib.suppress(BaseException):
                await f
        await self._close_lanes()

    async def _close_links(self) -> None:
        self._closed = True
        self._released.set()  # what waits for a release finds the link closed instead
        t, self._mirror_task = self._mirror_task, None
        if t is not None:
            t.cancel()
            with contextlib.suppress(BaseException):
                await t
        while not self._mirror_q.empty():  # dropped: no barrier may wait for them
            self._gate.leave(self._mirror_q.get_nowait()[2])
            self._mirror_q.task_done()
        await self._close_lanes()
        src, self._source = self._source, None
        if src is not None:
            with contextlib.suppress(Exception):
                await src.aclose()

    def set_fill_rate(self, bytes_per_s: int) -> None:
        """Change the background fill's rate limit (0: unlimited); applies at once."""
        self._bucket.set_rate(bytes_per_s)

    async def drain_mirror(self) -> None:
        """Wait until every async-mirrored write reached the source."""
        await self._mirror_q.join()

    # ------------------------------------------------------------ geometry

    @property
    def size_bytes(self) -> int:
        return self.local.size_bytes

    @property
    def block_size(self) -> int:
        return self.local.block_size

    def progress(self) -> Progress:
        bs = self.local.block_size
        present = min(self.local.present_blocks * bs, self.size_bytes)
        fetched = (self.local.present_blocks - self._present0) * bs
        elapsed = max(time.monotonic() - self._t0, 1e-6)
        rate = fetched / elapsed
        left = self.size_bytes - present
        eta = 0.0 if left <= 0 else (left / rate if rate > 0 else None)
        return Progress(present, self.size_bytes, rate, eta)

    # ------------------------------------------------------------ BlockDevice

    @contextlib.contextmanager
    def _op(self) -> Iterator[bool]:
        """Count a call that may use the source; yields False once detaching began
        (the call is then purely local and nobody waits for it)."""
        if self._detaching:
            yield False
            return
        self._ops += 1
        self._idle.clear()
        try:
            yield True
        finally:
            self._ops -= 1
            if self._ops == 0:
                self._idle.set()

    async def read(self, offset: int, length: int) -> bytes:
        self.local.present(offset, length)  # range check (OutOfRange) before any fetch
        with self._op() as linked:
            if linked:
                await self._ensure(self._blocks(offset, length), from_read=True)
            return await self.local.read(offset, length)

    async def write(self, offset: int, data: bytes, *, fua: bool = False) -> None:
        self.local.present(offset, len(data))

        async def local() -> None:
            await self.local.write(offset, data, fua=fua)

        await lazy_link.write(self, offset, len(data), local, data, fua)

    async def write_zeroes(self, offset: int, length: int, *, fua: bool = False) -> None:
        self.local.present(offset, length)

        async def local() -> None:
            await self.local.write_zeroes(offset, length, fua=fua)

        await lazy_link.write(self, offset, length, local, None, fua)

    def write_barrier(self, offset: int, length: int) -> AbstractAsyncContextManager[None]:
        """Hold ``[offset, offset + length)`` free of writes on both copies: new writes
        to it wait, writes in flight (local and mirrored, async ones until delivered)
        finish first. Inside, both copies of the range hold the same state, so comparing
        them is exact (a migration's verify). Raises TimeoutError if writes in flight do
        not finish within ``fetch_timeout_s`` plus a grace period."""
        return self._gate.barrier(
            offset, offset + length, self.settings.fetch_timeout_s + _DETACH_GRACE_S
        )

    async def trim(self, offset: int, length: int) -> None:
        await self.write_zeroes(offset, length)

    async def flush(self) -> None:
        st = self.stats
        t0 = st.started()
        self._foreground += 1
        try:
            with self._op() as linked:
                if not (linked and self.settings.mirror == "sync"):
                    await self._flush_local()
                    return
                # Both at once (ext4's superblock write at mount waits on it in a switch).
                got = await asyncio.gather(self._flush_local(), self._flush_source(),
                                           return_exceptions=True)  # fmt: skip
                for r in got:
                    if isinstance(r, BaseException):
                        raise r
        finally:
            self._foreground -= 1
            st.flush_ended(t0)

    async def _flush_local(self) -> None:
        t = time.perf_counter()
        await self.local.flush()
        self.stats.flush_local.add(time.perf_counter() - t)

    async def _flush_source(self) -> None:
        deadline = time.monotonic() + self.settings.fetch_timeout_s
        t = time.perf_counter()
        try:
            await lazy_link.on_source(self, "flush", _flush, deadline)
            self.stats.flush_source.add(time.perf_counter() - t)
        except SourceUnavailable:
            if not self._detaching:
                raise
            log.warning("lazy volume: flush at detach did not reach the source")

    def present(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        return self.local.present(offset, length)

    def allocated(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """Holes only where present blocks are holes: a missing block's bytes are at the
        source, so it counts as data (a peer filling from us must fetch it)."""
        out: list[tuple[int, int, bool]] = []
        for off, n, here in self.local.present(offset, length):
            parts = self.local.allocated(off, n) if here else [(off, n, True)]
            for o, m, data in parts:
                if out and out[-1][2] == data and out[-1][0] + out[-1][1] == o:
                    out[-1] = (out[-1][0], out[-1][1] + m, data)
                else:
                    out.append((o, m, data))
        return out

    def file_extent(self, offset: int, length: int) -> tuple[int, int] | None:
        """Zero-copy reads only where every block is already here."""
        first, end = self._span(offset, length)
        if all(self.local.is_present(b) for b in range(first, end)):
            return self.local.file_extent(offset, length)
        return None

    # ------------------------------------------------------------ storing fetched blocks

    def _span(self, offset: int, length: int) -> tuple[int, int]:
        bs = self.local.block_size
        if length == 0:
            return offset // bs, offset // bs
        return offset // bs, (offset + length - 1) // bs + 1

    def _blocks(self, offset: int, length: int) -> list[int]:
        first, end = self._span(offset, length)
        return list(range(first, end))

    def _writing_span(self, offset: int, length: int) -> AbstractAsyncContextManager[None]:
        """Name the write's blocks so lane stores skip them (rule 2)."""
        return self._claims.write(self._span(offset, length))

    def _store(self, first: int, data: bytes | memoryview, *, lane: bool) -> int:
        """Store fetched blocks from ``first`` that are still missing (rules 2 and 3)."""
        return self._claims.store(first, data, lane=lane)

    def _store_zeroes(self, first: int, count: int) -> int:
        """Blocks the source holds as a hole: zeroed here, skipping taken ones (rule 2)."""
        return self._claims.store_zeroes(first, count)

    # ------------------------------------------------------------ fetching

    def _register(self, first: int, count: int) -> _Futures:
        """Claim blocks for one fetch, now (rule 1); the caller fetches exactly these."""
        loop = asyncio.get_running_loop()
        futs: _Futures = {}
        for b in range(first, first + count):
            assert b not in self._inflight
            futs[b] = self._inflight[b] = loop.create_future()
        return futs

    def _claim_runs(self, blocks: list[int]) -> tuple[list[_Futures], list[asyncio.Future[None]]]:
        """Missing blocks of ``blocks``: fetches to start (claimed now) and ones to await."""
        waits: list[asyncio.Future[None]] = []
        runs: list[list[int]] = []
        for b in blocks:
            if self.local.is_present(b):
                continue
            fut = self._inflight.get(b)
            if fut is not None:
                waits.append(fut)
                continue
            if runs and runs[-1][-1] + 1 == b:
                runs[-1].append(b)
            else:
                runs.append([b])
        return [self._register(r[0], len(r)) for r in runs], waits

    async def _prepare_write(self, offset: int, length: int) -> None:
        """Partially covered missing blocks are fetched first (the write merges into them).
        Fully covered ones need nothing: a fetch in flight cannot land over the write."""
        bs = self.local.block_size
        first, end = self._span(offset, length)
        partial = []
        for b in (first, end - 1):
            lo, hi = b * bs, min((b + 1) * bs, self.size_bytes)
            if length and not (offset <= lo and offset + length >= hi):
                partial.append(b)
        await self._ensure(sorted(set(partial)), from_read=True)

    async def _ensure(self, blocks: list[int], *, from_read: bool) -> None:
        """Make ``blocks`` present: fetch missing runs, wait for fetches in flight."""
        if all(self.local.is_present(b) for b in blocks):
            return
        await self._released.wait()
        deadline = time.monotonic() + self.settings.fetch_timeout_s
        first_round = True
        while True:
            claimed, waits = self._claim_runs(blocks)
            if not claimed and not waits:
                return
            if first_round and from_read:
                # the fill continues where the reader is
                self._cursor = max(b for b in blocks if b in self._inflight) + 1
            first_round = False
            fetches = [self._fetch_run(min(f), len(f), f, deadline) for f in claimed]
            results = await asyncio.gather(*fetches, *waits, return_exceptions=True)
            for r in results[: len(fetches)]:
                if isinstance(r, BaseException):
                    raise r
            # A fetch started by someone else may have failed, or a lane skipped a block
            # a write had taken: check again (a failed fetch by us raised above).
            if time.monotonic() >= deadline:
                still = [b for b in blocks if not self.local.is_present(b)]
                if still:
                    raise SourceUnavailable(f"blocks {still[:4]} not fetched in time")

    async def _fetch_run(
        self,
        first: int,
        count: int,
        futs: _Futures,
        deadline: float,
        *,
        lanes: FillLanes | None = None,
    ) -> None:
        """Fetch claimed blocks ``[first, first + count)``: a read miss with a plain read
        on the main connection, the fill (``lane``) straight into a buffer on the lane."""
        try:
            bs = self.local.block_size
            off = first * bs
            length = min(count * bs, self.size_bytes - off)
            if lanes is None:
                data = await lazy_link.on_source(
                    self, "volume source lost", _reader(off, length), deadline
                )
                self._store(first, data, lane=False)
            else:
                try:
                    await lanes.fetch(first, length, deadline, lambda: self._closed)
                except PeerUnavailable as e:
                    raise SourceUnavailable(f"volume source lost: {e}") from e
            self._since_flush += count
            for f in futs.values():
                f.set_result(None)
        except BaseException as e:
            for f in futs.values():
                if not f.done():
                    f.set_exception(e if isinstance(e, Exception) else asyncio.CancelledError())
                    f.exception()  # mark retrieved: waiters re-check presence anyway
            raise
        finally:
            for b, f in futs.items():
                if self._inflight.get(b) is f:
                    del self._inflight[b]

    async def _close_lanes(self) -> None:
        lanes, self._lanes = self._lanes, None
        if lanes is not None:
            self._lane_closers.add(lanes)
        for ls in list(self._lane_closers):  # also one a cancelled caller left closing
            await ls.close()
            self._lane_closers.discard(ls)


def _reader(offset: int, length: int) -> Callable[[RemoteSource], Awaitable[bytes]]:
    async def read(src: RemoteSource) -> bytes:
        return await src.read(offset, length)

    return read


async def _flush(src: RemoteSource) -> None:
    await src.flush()

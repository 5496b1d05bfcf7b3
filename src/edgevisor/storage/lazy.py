"""A lazy volume: a local Volume whose missing blocks come from a remote source on demand.

Used on a migration target after the switch. It is a
:class:`~edgevisor.storage.blockdev.BlockDevice`:

* **read**: missing blocks in the range are fetched from the source first (whole blocks,
  in one request per contiguous run), stored locally and marked present, then the bytes
  are read locally. A read miss is fetched at once, ahead of the background fill, and
  moves the fill's cursor to the block after it (reads tend to continue).
* **write**: a partially covered missing block is fetched and merged first; a block with
  a fetch in flight waits for it, so a late fetch can never overwrite a newer write.
  Mirroring to the source: ``off``, ``async`` (queued in order, sent in the background,
  retried until the source takes them) or ``sync`` (acknowledged only after the source
  took the write, with FUA when the caller asked for it).
* **background fill**: runs of missing blocks (``fill_batch_blocks`` per request,
  ``fill_inflight`` requests in flight over the pipelined client) under a token-bucket
  rate limit; progress (bytes present / total, rate, ETA) never goes backwards because
  present blocks never become missing.
* **source outage**: a fetch waits up to ``fetch_timeout_s`` for the source to come back
  (reconnecting every ``reconnect_interval_s``) and then fails with
  :class:`SourceUnavailable` (served as EIO over NBD); the fill keeps retrying and
  resumes by itself when the source returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from edgevisor.errors import PeerUnavailable
from edgevisor.storage.volume import Volume

__all__ = ["LazySettings", "LazyVolume", "Progress", "RemoteSource", "SourceUnavailable"]

log = logging.getLogger(__name__)


class SourceUnavailable(PeerUnavailable):
    """The source did not answer within ``fetch_timeout_s``."""

    code = "source_unavailable"


class RemoteSource(Protocol):
    """What a lazy volume needs from its source (an :class:`NBDClient` fits)."""

    @property
    def size_bytes(self) -> int: ...

    async def read(self, offset: int, length: int) -> bytes: ...

    async def write(self, offset: int, data: bytes, *, fua: bool = False) -> None: ...

    async def flush(self) -> None: ...

    async def aclose(self) -> None: ...


class LazySettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    fetch_timeout_s: float = Field(
        30.0, ge=0, description="How long a read waits for an absent source before EIO."
    )
    reconnect_interval_s: float = Field(
        0.2, gt=0, description="Pause between attempts to reach an absent source."
    )
    fill_batch_blocks: int = Field(
        16, ge=1, le=512, description="Blocks per background fill request."
    )
    fill_inflight: int = Field(8, ge=1, le=256, description="Fill requests in flight at once.")
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


class _TokenBucket:
    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.tokens = float(rate)
        self.t = time.monotonic()

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
            await asyncio.sleep((n - self.tokens) / self.rate)


class LazyVolume:
    """See the module docstring."""

    def __init__(
        self,
        local: Volume,
        connect: Callable[[], Awaitable[RemoteSource]],
        settings: LazySettings | None = None,
    ) -> None:
        self.local = local
        self.settings = settings or LazySettings()
        self._connect = connect
        self._source: RemoteSource | None = None
        self._conn_lock = asyncio.Lock()
        self._inflight: dict[int, asyncio.Future[None]] = {}
        self._cursor = 0
        self._bucket = _TokenBucket(self.settings.fill_rate_bytes_per_s)
        self._fill_task: asyncio.Task[None] | None = None
        self._mirror_q: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue()
        self._mirror_task: asyncio.Task[None] | None = None
        self._since_flush = 0
        self.filled = asyncio.Event()
        self._t0 = time.monotonic()
        self._present0 = local.present_blocks
        if not local.missing_blocks():
            self.filled.set()

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the background fill (and the async mirror, if configured)."""
        if self._fill_task is None and not self.filled.is_set():
            self._fill_task = asyncio.create_task(self._fill())
            self._fill_task.add_done_callback(_log_crash)
        if self.settings.mirror == "async" and self._mirror_task is None:
            self._mirror_task = asyncio.create_task(self._mirror_loop())
            self._mirror_task.add_done_callback(_log_crash)

    async def aclose(self) -> None:
        for t in (self._fill_task, self._mirror_task):
            if t is not None:
                t.cancel()
                with contextlib.suppress(BaseException):
                    await t
        self._fill_task = self._mirror_task = None
        if self._source is not None:
            with contextlib.suppress(Exception):
                await self._source.aclose()
            self._source = None
        await self.local.flush()

    def set_fill_rate(self, bytes_per_s: int) -> None:
        """Change the background fill's rate limit (0: unlimited); applies at once."""
        self._bucket.rate = max(0, bytes_per_s)
        self._bucket.tokens = min(self._bucket.tokens, float(max(bytes_per_s, 0)))

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

    async def read(self, offset: int, length: int) -> bytes:
        self.local.present(offset, length)  # range check (OutOfRange) before any fetch
        await self._ensure(self._blocks(offset, length), from_read=True)
        return await self.local.read(offset, length)

    async def write(self, offset: int, data: bytes, *, fua: bool = False) -> None:
        self.local.present(offset, len(data))
        await self._prepare_write(offset, len(data))
        await self.local.write(offset, data, fua=fua)
        await self._mirror(offset, data, fua)

    async def write_zeroes(self, offset: int, length: int, *, fua: bool = False) -> None:
        self.local.present(offset, length)
        await self._prepare_write(offset, length)
        await self.local.write_zeroes(offset, length, fua=fua)
        await self._mirror(offset, bytes(length), fua)

    async def trim(self, offset: int, length: int) -> None:
        await self.write_zeroes(offset, length)

    async def flush(self) -> None:
        await self.local.flush()
        if self.settings.mirror == "sync":
            src = await self._get_source(time.monotonic() + self.settings.fetch_timeout_s)
            await src.flush()

    def present(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        return self.local.present(offset, length)

    def allocated(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        return self.local.allocated(offset, length)

    def file_extent(self, offset: int, length: int) -> tuple[int, int] | None:
        """Zero-copy reads only where every block is already here."""
        first, end = self._span(offset, length)
        if all(self.local.is_present(b) for b in range(first, end)):
            return self.local.file_extent(offset, length)
        return None

    # ------------------------------------------------------------ fetching

    def _span(self, offset: int, length: int) -> tuple[int, int]:
        bs = self.local.block_size
        if length == 0:
            return offset // bs, offset // bs
        return offset // bs, (offset + length - 1) // bs + 1

    def _blocks(self, offset: int, length: int) -> list[int]:
        first, end = self._span(offset, length)
        return list(range(first, end))

    async def _prepare_write(self, offset: int, length: int) -> None:
        bs = self.local.block_size
        first, end = self._span(offset, length)
        partial = []
        for b in (first, end - 1):
            lo, hi = b * bs, min((b + 1) * bs, self.size_bytes)
            if length and not (offset <= lo and offset + length >= hi):
                partial.append(b)
        await self._ensure(sorted(set(partial)), from_read=True)
        # Full blocks with a fetch in flight: let it land first, so it cannot win.
        waits = [self._inflight[b] for b in range(first, end) if b in self._inflight]
        if waits:
            await asyncio.gather(*waits, return_exceptions=True)

    async def _ensure(self, blocks: list[int], *, from_read: bool) -> None:
        """Make ``blocks`` present: fetch missing runs, wait for fetches in flight."""
        missing = [b for b in blocks if not self.local.is_present(b)]
        if not missing:
            return
        waits: list[asyncio.Future[None]] = []
        run: list[int] = []
        runs: list[list[int]] = []
        for b in missing:
            fut = self._inflight.get(b)
            if fut is not None:
                waits.append(fut)
                continue
            if run and run[-1] + 1 != b:
                runs.append(run)
                run = []
            run.append(b)
        if run:
            runs.append(run)
        if from_read and missing:
            self._cursor = missing[-1] + 1  # the fill continues where the reader is
        deadline = time.monotonic() + self.settings.fetch_timeout_s
        fetches = [self._fetch_run(r[0], len(r), deadline) for r in runs]
        results = await asyncio.gather(*fetches, *waits, return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        # A fetch started by someone else may have failed: check, and retry once directly.
        still = [b for b in missing if not self.local.is_present(b)]
        if still:
            for b in still:
                await self._fetch_run(b, 1, deadline)

    async def _fetch_run(self, first: int, count: int, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        futs = {}
        for b in range(first, first + count):
            futs[b] = loop.create_future()
            self._inflight[b] = futs[b]
        try:
            bs = self.local.block_size
            off = first * bs
            length = min(count * bs, self.size_bytes - off)
            data = await self._source_read(off, length, deadline)
            self.local.fill_blocks(first, data)
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

    async def _get_source(self, deadline: float) -> RemoteSource:
        while True:
            if self._source is not None:
                return self._source
            async with self._conn_lock:
                if self._source is not None:
                    return self._source
                try:
                    self._source = await self._connect()
                    return self._source
                except (PeerUnavailable, OSError) as e:
                    if time.monotonic() >= deadline:
                        raise SourceUnavailable(f"volume source unreachable: {e}") from e
            await asyncio.sleep(self.settings.reconnect_interval_s)

    async def _drop_source(self, src: RemoteSource) -> None:
        if self._source is src:
            self._source = None
            with contextlib.suppress(Exception):
                await src.aclose()

    async def _source_read(self, offset: int, length: int, deadline: float) -> bytes:
        while True:
            src = await self._get_source(deadline)
            try:
                return await src.read(offset, length)
            except PeerUnavailable as e:
                await self._drop_source(src)
                if time.monotonic() >= deadline:
                    raise SourceUnavailable(f"volume source lost: {e}") from e
                await asyncio.sleep(self.settings.reconnect_interval_s)

    # ------------------------------------------------------------ background fill

    def _next_runs(self, limit: int) -> list[tuple[int, int]]:
        """Up to ``limit`` runs of missing, not-in-flight blocks from the cursor on."""
        n = self.local.nblocks
        out: list[tuple[int, int]] = []
        b, scanned = self._cursor % max(n, 1), 0
        batch = self.settings.fill_batch_blocks
        while scanned < n and len(out) < limit:
            if not self.local.is_present(b) and b not in self._inflight:
                first = b
                while (
                    b + 1 < n
                    and b + 1 - first < batch
                    and not self.local.is_present(b + 1)
                    and b + 1 not in self._inflight
                ):
                    b += 1
                    scanned += 1
                out.append((first, b - first + 1))
            b += 1
            scanned += 1
            if b >= n:
                b = 0
        self._cursor = b
        return out

    async def _fill(self) -> None:
        inflight: set[asyncio.Task[None]] = set()
        bs = self.local.block_size
        try:
            while True:
                while len(inflight) < self.settings.fill_inflight:
                    runs = self._next_runs(1)
                    if not runs:
                        break
                    first, count = runs[0]
                    await self._bucket.take(count * bs)
                    if any(self.local.is_present(b) for b in range(first, first + count)):
                        continue  # a reader got there during the rate-limit wait
                    deadline = time.monotonic() + self.settings.fetch_timeout_s
                    t = asyncio.create_task(self._fetch_run(first, count, deadline))
                    inflight.add(t)
                if not inflight:
                    if not self.local.missing_blocks():
                        await self.local.flush()
                        self.filled.set()
                        return
                    await asyncio.sleep(self.settings.reconnect_interval_s)
                    continue
                done, inflight = await asyncio.wait(inflight, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    if t.exception() is not None:  # source away: keep trying, slower
                        log.info("lazy fill: %s", t.exception())
                        await asyncio.sleep(self.settings.reconnect_interval_s)
                if self._since_flush >= self.settings.flush_every_blocks:
                    self._since_flush = 0
                    await self.local.flush()
        finally:
            for t in inflight:
                t.cancel()

    # ------------------------------------------------------------ mirroring

    async def _mirror(self, offset: int, data: bytes, fua: bool) -> None:
        mode = self.settings.mirror
        if mode == "off":
            return
        if mode == "async":
            self._mirror_q.put_nowait((offset, data))
            return
        deadline = time.monotonic() + self.settings.fetch_timeout_s
        while True:
            src = await self._get_source(deadline)
            try:
                await src.write(offset, data, fua=fua)
                return
            except PeerUnavailable as e:
                await self._drop_source(src)
                if time.monotonic() >= deadline:
                    raise SourceUnavailable(f"mirror write failed: {e}") from e
                await asyncio.sleep(self.settings.reconnect_interval_s)

    async def _mirror_loop(self) -> None:
        while True:
            offset, data = await self._mirror_q.get()
            try:
                while True:
                    try:
                        src = await self._get_source(time.monotonic() + 3600)
                        await src.write(offset, data)
                        break
                    except PeerUnavailable:
                        if self._source is not None:
                            await self._drop_source(self._source)
                        await asyncio.sleep(self.settings.reconnect_interval_s)
            finally:
                self._mirror_q.task_done()


def _log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("lazy volume background task died", exc_info=task.exception())

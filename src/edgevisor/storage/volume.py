"""A fixed-size volume: a sparse data file plus persistent per-block state.

A volume lives in a directory::

    <path>/data      the bytes, a sparse file of exactly ``size_bytes``
    <path>/state     snapshot of the block bitmaps (see :mod:`edgevisor.storage.bitmap`)
    <path>/journal   append-only journal over the snapshot

It implements :class:`~edgevisor.storage.blockdev.BlockDevice`. Data I/O is plain
``os.pread``/``os.pwrite`` on the event loop (page-cache copies are fast); ``fdatasync``
and journal commits run in a worker thread, one at a time, group-committing whatever
accumulated meanwhile.

Durability rules (why the code is ordered as it is):

* A write marks the blocks it fully covers present in memory at once (reads need it),
  but the *present* bit is journaled only at the next flush/FUA, **after** ``fdatasync``
  of the data file -- so a persisted present bit always has durable data behind it.
  A partially covered block keeps its present bit (a lazy volume merges before writing).
* Once a mark was set (:meth:`Volume.set_mark`), the first write to a block since the
  mark journals a *written* intent record **before** the data is written, so a crash can
  never leave changed data that the written-since-mark bitmap does not know about.
  Without a mark nothing is tracked and :meth:`written_since_mark` reports every block.
* On open a damaged snapshot or journal leaves the volume *corrupt*: every I/O raises
  :class:`~edgevisor.storage.bitmap.StateCorrupt` until :meth:`Volume.verify` rebuilds
  the state (present = blocks holding data, written = all blocks).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import hashlib
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

from edgevisor.errors import AlreadyExists, ConfigError, NotFound
from edgevisor.storage.bitmap import Bitmap, JournalOp, StateCorrupt, StateHeader, StateStore
from edgevisor.storage.blockdev import OutOfRange

__all__ = ["DEFAULT_BLOCK_SIZE", "StateCorrupt", "VerifyReport", "Volume"]

DEFAULT_BLOCK_SIZE = 64 * 1024
_DIRECT_ALIGN = 4096  # O_DIRECT: buffer address, offset and length in these units

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def _punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate a range (reads back as zeroes); False if the filesystem cannot."""
    mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
    if _libc.fallocate(fd, mode, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS):
        return False
    raise OSError(err, os.strerror(err))


@dataclass(frozen=True)
class VerifyReport:
    rebuilt: bool
    present_blocks: int
    nblocks: int


def _runs(blocks: list[int]) -> list[tuple[int, int]]:
    """Coalesce block indices into ``(first, count)`` runs."""
    out: list[tuple[int, int]] = []
    for b in sorted(set(blocks)):
        if out and out[-1][0] + out[-1][1] == b:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((b, 1))
    return out


class Volume:
    """A local block volume (see the module docstring for layout and durability)."""

    def __init__(self, path: Path, store: StateStore, fd: int, corrupt: str | None) -> None:
        self.path = path
        self._store = store
        self._fd = fd
        self._size = store.header.size_bytes
        self._bs = store.header.block_size
        self._nblocks = store.header.nblocks
        self.corrupt_reason = corrupt
        self._present = store.present.copy()
        self._written = store.written.copy()
        self._pending_present: list[int] = []
        self._lock = asyncio.Lock()  # serialises StateStore commits and fdatasync
        # Guards the live bitmaps and the pending list: NBD sessions on worker threads
        # write through write_nowait while the owning loop flushes.
        self._mlock = threading.Lock()
        self._fast_ok = True
        self._fast_active = 0
        self._tracking = store.tracking  # live view; True from the moment a mark begins
        self._closed = False
        self._dfd = -1  # O_DIRECT twin of _fd for fill stores (opened on first use)
        self._direct_ok = True

    # ------------------------------------------------------------ lifecycle

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        size_bytes: int,
        block_size: int = DEFAULT_BLOCK_SIZE,
        *,
        present: bool = True,
    ) -> Volume:
        """Create a zero-filled volume; ``present=False`` starts with every block missing."""
        p = Path(path)
        if size_bytes <= 0:
            raise ConfigError(f"volume size must be positive, got {size_bytes}")
        if block_size < 512 or block_size > 1 << 24 or block_size & (block_size - 1):
            raise ConfigError(f"block size must be a power of two in [512, 16M]: {block_size}")
        try:
            p.mkdir(parents=True)
        except FileExistsError:
            raise AlreadyExists(f"volume {p} already exists") from None
        try:
            with open(p / "data", "wb") as f:
                f.truncate(size_bytes)
                os.fsync(f.fileno())
            store = StateStore(p, StateHeader(block_size=block_size, size_bytes=size_bytes))
            store.present.fill(present)
            store.open_journal()
            store.write_snapshot()
            store.close()
        except BaseException:
            shutil.rmtree(p, ignore_errors=True)
            raise
        return cls.open(p)

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Volume:
        """Open a volume; damaged state opens it *corrupt* (I/O refused until verify)."""
        p = Path(path)
        if not (p / "data").exists():
            raise NotFound(f"no volume at {p}")
        header = StateStore.read_header(p)
        if os.stat(p / "data").st_size != header.size_bytes:
            raise StateCorrupt(f"{p}: data file size does not match the state header")
        store = StateStore(p, header)
        corrupt: str | None = None
        try:
            store.load()
        except StateCorrupt as e:
            corrupt = e.message
            store = StateStore(p, header)
        store.open_journal()
        fd = os.open(p / "data", os.O_RDWR)
        return cls(p, store, fd, corrupt)

    def close(self) -> None:
        """Flush (data, then pending present bits) and release the files."""
        if self._closed:
            return
        if self.corrupt_reason is None:
            os.fdatasync(self._fd)
            self._store.commit(self._take_pending())
        os.close(self._fd)
        if self._dfd >= 0:
            os.close(self._dfd)
            self._dfd = -1
        self._store.close()
        self._closed = True

    async def aclose(self) -> None:
        async with self._lock:
            await asyncio.to_thread(self.close)

    # ------------------------------------------------------------ geometry

    @property
    def size_bytes(self) -> int:
        return self._size

    @property
    def block_size(self) -> int:
        return self._bs

    @property
    def nblocks(self) -> int:
        return self._nblocks

    @property
    def data_path(self) -> Path:
        return self.path / "data"

    def _check(self, offset: int, length: int) -> None:
        if self._closed:
            raise RuntimeError("volume is closed")
        if self.corrupt_reason is not None:
            raise StateCorrupt(f"volume {self.path} needs verify: {self.corrupt_reason}")
        if offset < 0 or length < 0 or offset + length > self._size:
            raise OutOfRange(
                f"range [{offset}, {offset + length}) outside volume of {self._size} bytes"
            )

    def _span(self, offset: int, length: int) -> tuple[int, int]:
        """Blocks touched by the range: ``(first, end)``."""
        if length == 0:
            return offset // self._bs, offset // self._bs
        return offset // self._bs, (offset + length - 1) // self._bs + 1

    def _full_blocks(self, offset: int, length: int) -> range:
        """Blocks the range covers entirely (the short last block counts if reached)."""
        first = -(-offset // self._bs)
        end_off = offset + length
        end = self._nblocks if end_off >= self._size else end_off // self._bs
        return range(first, max(first, end))

    # ------------------------------------------------------------ BlockDevice

    async def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        return os.pread(self._fd, length, offset)

    def read_sync(self, offset: int, length: int) -> bytes:
        """Blocking read for thread-side callers (checksums, FUSE workers)."""
        self._check(offset, length)
        return os.pread(self._fd, length, offset)

    async def write(self, offset: int, data: bytes, *, fua: bool = False) -> None:
        self._check(offset, len(data))
        await self._intent(offset, len(data))
        view = memoryview(data)
        done = 0
        while done < len(data):
            done += os.pwrite(self._fd, view[done:], offset + done)
        self._wrote(offset, len(data))
        if fua:
            await self.flush()

    def write_nowait(self, offset: int, data: bytes | memoryview) -> bool:
        """Fast path for servers: write now if no intent record must be journaled first.

        Returns False (nothing written) when the caller must use :meth:`write`.
        """
        self._check(offset, len(data))
        with self._mlock:
            if not self._fast_ok:
                return False
            if self._tracking:
                first, end = self._span(offset, len(data))
                if not self._written.all(first, end - first):
                    return False
            self._fast_active += 1  # set_mark waits for us: no write slips past a mark
        try:
            view = memoryview(data)
            done = 0
            while done < len(view):
                done += os.pwrite(self._fd, view[done:], offset + done)
            self._wrote(offset, len(view))
        finally:
            with self._mlock:
                self._fast_active -= 1
        return True

    def file_extent(self, offset: int, length: int) -> tuple[int, int]:
        """``(fd, file_offset)`` holding these bytes, for zero-copy reads (sendfile)."""
        self._check(offset, length)
        return self._fd, offset

    async def write_zeroes(self, offset: int, length: int, *, fua: bool = False) -> None:
        self._check(offset, length)
        await self._intent(offset, length)
        self._zero(offset, length)
        self._wrote(offset, length)
        if fua:
            await self.flush()

    async def trim(self, offset: int, length: int) -> None:
        # Trimmed bytes read back as zeroes here: same effect as write_zeroes.
        await self.write_zeroes(offset, length)

    async def flush(self) -> None:
        if self._closed:
            raise RuntimeError("volume is closed")
        if self.corrupt_reason is not None:
            raise StateCorrupt(f"volume {self.path} needs verify: {self.corrupt_reason}")
        async with self._lock:
            pending = self._take_pending()
            await asyncio.to_thread(os.fdatasync, self._fd)
            if pending:
                await asyncio.to_thread(self._store.commit, pending)

    def present(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        self._check(offset, length)
        return self._extents(self._present, offset, length)

    def allocated(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        self._check(offset, length)
        out: list[tuple[int, int, bool]] = []
        pos, end = offset, offset + length
        while pos < end:
            try:
                data = os.lseek(self._fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno != errno.ENXIO:
                    raise
                data = end  # no data after pos: the rest is a hole
            if data > pos:
                out.append((pos, min(data, end) - pos, False))
                pos = min(data, end)
                continue
            hole = min(os.lseek(self._fd, pos, os.SEEK_HOLE), end)
            out.append((pos, hole - pos, True))
            pos = hole
        return out

    # ------------------------------------------------------------ sync state

    def mark_present(self, offset: int, length: int) -> None:
        """Mark the fully covered blocks present (journaled at the next flush)."""
        self._check(offset, length)
        self._wrote(offset, length)

    def fill_blocks(self, first: int, data: bytes, *, direct: bool = False) -> int:
        """Store fetched content for whole blocks from ``first`` that are still missing.

        Blocks that became present meanwhile (a local write won) are left alone; no
        written-since-mark intent is logged (this is sync, not a change). Returns the
        number of blocks stored; they are journaled present at the next flush.

        ``direct``: write with ``O_DIRECT`` where buffer, offset and length allow it (a
        page-aligned buffer such as a lane's ``mmap``; else, or on a filesystem without
        it, a plain ``pwrite``). Why: a bulk fill writes every byte once and nobody reads
        it back soon; through the page cache each byte is copied into a freshly allocated
        page (on a VM with free-page reporting, a host fault per page: most of a fill's
        CPU), and written back later anyway. The fill's next flush makes it durable as
        before (``fdatasync`` covers the inode however it was written).
        """
        offset = first * self._bs
        self._check(offset, len(data))
        view = memoryview(data)
        stored = 0
        nblocks = -(-len(data) // self._bs)
        i = 0
        while i < nblocks:  # one pwrite per run of still-missing blocks
            if self._present.get(first + i):
                i += 1
                continue
            j = i + 1
            while j < nblocks and not self._present.get(first + j):
                j += 1
            chunk = view[i * self._bs : j * self._bs]
            at = (first + i) * self._bs
            if not (direct and self._pwrite_direct(chunk, at)):
                done = 0
                while done < len(chunk):
                    done += os.pwrite(self._fd, chunk[done:], at + done)
            self._wrote(at, len(chunk))
            stored += j - i
            i = j
        return stored

    def fill_zero_blocks(self, first: int, count: int) -> int:
        """Like :meth:`fill_blocks` for blocks whose fetched content is all zeroes (a
        hole at the source): the still-missing ones are deallocated here (read back as
        zeroes, whatever the file held) and become present, without any data copied."""
        offset = first * self._bs
        end_off = min((first + count) * self._bs, self._size)
        self._check(offset, end_off - offset)
        stored = 0
        i = 0
        while i < count:
            if self._present.get(first + i):
                i += 1
                continue
            j = i + 1
            while j < count and not self._present.get(first + j):
                j += 1
            at = (first + i) * self._bs
            n = min((first + j) * self._bs, self._size) - at
            self._zero(at, n)
            self._wrote(at, n)
            stored += j - i
            i = j
        return stored

    def _pwrite_direct(self, chunk: memoryview, at: int) -> bool:
        """Write ``chunk`` at ``at`` with O_DIRECT; False (nothing written) if it cannot."""
        if not self._direct_ok or at % _DIRECT_ALIGN or len(chunk) % _DIRECT_ALIGN:
            return False
        if self._dfd < 0:
            with self._mlock:  # lanes on several threads: open it once
                if self._dfd < 0:
                    try:
                        self._dfd = os.open(self.data_path, os.O_WRONLY | os.O_DIRECT)
                    except OSError:  # e.g. tmpfs: no O_DIRECT
                        self._direct_ok = False
                        return False
        done = 0
        try:
            while done < len(chunk):
                n = os.pwrite(self._dfd, chunk[done:], at + done)
                if n == 0 or n % _DIRECT_ALIGN:  # a short odd write: finish buffered
                    done += n
                    break
                done += n
        except OSError as e:
            if e.errno != errno.EINVAL or done:  # EINVAL: this buffer is not aligned
                raise
            return False
        while done < len(chunk):
            done += os.pwrite(self._fd, chunk[done:], at + done)
        return True

    def is_present(self, block: int) -> bool:
        return self._present.get(block)

    def next_missing(self, start: int, end: int) -> int:
        """The first missing block in ``[start, end)``, or ``end``."""
        return self._present.find(False, start, end)

    def next_present(self, start: int, end: int) -> int:
        """The first present block in ``[start, end)``, or ``end``."""
        return self._present.find(True, start, end)

    def missing_blocks(self) -> list[int]:
        return list(self._present.indices(False))

    @property
    def present_blocks(self) -> int:
        return self._present.count()

    async def set_mark(self) -> None:
        """Start (or restart) tracking: written-since-mark becomes empty, durably."""
        self._check(0, 0)
        async with self._lock:
            with self._mlock:
                self._fast_ok = False
            while self._fast_active:  # fast-path writes on other threads finish first
                await asyncio.sleep(0.0005)
            # Clear before the commit: a write from here on must journal its intent
            # (after this CLEAR, since intents take the same lock).
            self._written.fill(False)
            self._tracking = True
            try:
                await asyncio.to_thread(
                    self._store.commit, [(JournalOp.CLEAR_WRITTEN, 0, self._nblocks)]
                )
            finally:
                with self._mlock:
                    self._fast_ok = True

    @property
    def tracking(self) -> bool:
        return self._tracking

    def written_since_mark(self) -> list[int]:
        """Blocks written since the last mark; every block if no mark was ever set."""
        if not self._tracking:
            return list(range(self._nblocks))
        return list(self._written.indices(True))

    async def checksum(self) -> str:
        """sha256 hex digest of the whole content (for migration's verify step)."""
        self._check(0, 0)

        def digest() -> str:
            h = hashlib.sha256()
            chunk = 4 << 20
            for off in range(0, self._size, chunk):
                h.update(os.pread(self._fd, min(chunk, self._size - off), off))
            return h.hexdigest()

        return await asyncio.to_thread(digest)

    async def verify(self, *, all_present: bool = False) -> VerifyReport:
        """Rebuild corrupt state; a healthy volume is left as it is.

        Rebuilt state is conservative: *present* = blocks holding allocated data (or all
        blocks with ``all_present``), *written since mark* = every block, so a later
        resync copies everything rather than miss a change.
        """
        if self.corrupt_reason is None:
            return VerifyReport(False, self._present.count(), self._nblocks)
        async with self._lock:
            await asyncio.to_thread(self._rebuild, all_present)
        return VerifyReport(True, self._present.count(), self._nblocks)

    def _rebuild(self, all_present: bool) -> None:
        store = self._store
        store.present = Bitmap(self._nblocks, fill=all_present)
        if not all_present:
            self.corrupt_reason = None  # allocated() checks it
            for off, length, is_data in self.allocated(0, self._size):
                if is_data:
                    first, end = self._span(off, length)
                    store.present.set_range(first, end - first)
        store.written = Bitmap(self._nblocks, fill=True)
        store.tracking = True
        self._tracking = True
        store.write_snapshot()
        self._present = store.present.copy()
        self._written = store.written.copy()
        self._pending_present = []
        self.corrupt_reason = None

    # ------------------------------------------------------------ internals

    def _extents(self, bm: Bitmap, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """Byte extents of the bitmap's runs, clipped to ``[offset, offset + length)``."""
        first, end = self._span(offset, length)
        out: list[tuple[int, int, bool]] = []
        for b, n, v in bm.runs(first, end):
            lo = max(offset, b * self._bs)
            hi = min(offset + length, (b + n) * self._bs)
            out.append((lo, hi - lo, v))
        return out

    def _zero(self, offset: int, length: int) -> None:
        if length == 0:
            return
        if _punch_hole(self._fd, offset, length):
            return
        zero = bytes(min(length, 1 << 20))
        pos = offset
        while pos < offset + length:
            n = min(len(zero), offset + length - pos)
            pos += os.pwrite(self._fd, zero[:n], pos)

    async def _intent(self, offset: int, length: int) -> None:
        """Journal the written-since-mark intent before the data may reach the disk."""
        if not self._tracking or length == 0:
            return
        first, end = self._span(offset, length)
        if self._written.all(first, end - first):
            return
        async with self._lock:
            need = [b for b in range(first, end) if not self._written.get(b)]
            if need:
                recs = [(JournalOp.SET_WRITTEN, f, c) for f, c in _runs(need)]
                await asyncio.to_thread(self._store.commit, recs)
                for f, c in _runs(need):
                    self._written.set_range(f, c)

    def _wrote(self, offset: int, length: int) -> None:
        """Fully covered blocks become present now; journaled after the next fdatasync."""
        blocks = self._full_blocks(offset, length)
        if not blocks or self._present.all(blocks.start, len(blocks)):
            return
        with self._mlock:
            for b in blocks:
                if not self._present.get(b):
                    self._present.set_range(b, 1)
                    self._pending_present.append(b)

    def _take_pending(self) -> list[tuple[JournalOp, int, int]]:
        with self._mlock:
            pending, self._pending_present = self._pending_present, []
        return [(JournalOp.SET_PRESENT, f, c) for f, c in _runs(pending)]

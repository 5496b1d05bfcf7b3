"""A plain file as a :class:`~edgevisor.storage.blockdev.BlockDevice`.

The simplest device there is: a fixed-size (sparse) file read and written with
``pread``/``pwrite``. It has no sync state (every block is present) and it exists so the
FUSE exposure, its tests and its benchmark can run before the real ``Volume`` is wired in;
it is also the ``file`` kind of ``python -m edgevisor.storage.fuse_image``.

The calls do blocking I/O on the event loop thread on purpose: for page-cached or
local-SSD data a ``pread`` costs microseconds, less than handing it to a thread.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from edgevisor.errors import NotFound, RequestError
from edgevisor.storage.blockdev import OutOfRange

__all__ = ["FileBlockDevice", "create_file_device", "open_file_device"]

DEFAULT_BLOCK_SIZE = 65536


class FileBlockDevice:
    """A fixed-size file as a block device; its size is the file's size at open."""

    def __init__(self, path: Path, *, block_size: int = DEFAULT_BLOCK_SIZE) -> None:
        if block_size <= 0 or block_size & (block_size - 1):
            raise RequestError(f"block size must be a power of two, not {block_size}")
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError as exc:
            raise NotFound(f"no device file {path}") from exc
        self._path = path
        self._size = os.fstat(self._fd).st_size
        self._block_size = block_size

    @property
    def path(self) -> Path:
        return self._path

    @property
    def size_bytes(self) -> int:
        return self._size

    @property
    def block_size(self) -> int:
        return self._block_size

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self._size:
            raise OutOfRange(
                f"range {offset}+{length} is outside the device (size {self._size})",
                details={"offset": offset, "length": length, "size_bytes": self._size},
            )

    async def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        data = os.pread(self._fd, length, offset)
        if len(data) < length:  # only if someone truncated the file under us
            data += bytes(length - len(data))
        return data

    async def write(self, offset: int, data: bytes, *, fua: bool = False) -> None:
        self._check(offset, len(data))
        view = memoryview(data)
        while view:
            done = os.pwrite(self._fd, view, offset)
            view = view[done:]
            offset += done
        if fua:
            os.fdatasync(self._fd)

    async def write_zeroes(self, offset: int, length: int, *, fua: bool = False) -> None:
        self._check(offset, length)
        self._punch(offset, length)
        if fua:
            os.fdatasync(self._fd)

    async def trim(self, offset: int, length: int) -> None:
        self._check(offset, length)
        self._punch(offset, length)

    def _punch(self, offset: int, length: int) -> None:
        if length == 0:
            return
        try:
            _punch_hole(self._fd, offset, length)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            zero = bytes(min(length, 1 << 20))
            end = offset + length
            while offset < end:
                n = min(len(zero), end - offset)
                os.pwrite(self._fd, zero[:n], offset)
                offset += n

    async def flush(self) -> None:
        os.fsync(self._fd)

    def present(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        self._check(offset, length)
        return [(offset, length, True)] if length else []

    def allocated(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        self._check(offset, length)
        out: list[tuple[int, int, bool]] = []
        pos, end = offset, offset + length
        while pos < end:
            try:
                data = os.lseek(self._fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    raise
                data = end  # no data after pos: the rest is a hole
            data = min(data, end)
            if data > pos:
                out.append((pos, data - pos, False))
                pos = data
                continue
            hole = min(os.lseek(self._fd, pos, os.SEEK_HOLE), end)
            out.append((pos, hole - pos, True))
            pos = hole
        return out

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _punch_hole(fd: int, offset: int, length: int) -> None:
    """``fallocate(PUNCH_HOLE | KEEP_SIZE)``; Python has no wrapper, so ctypes."""
    rc = _libc().fallocate(
        ctypes.c_int(fd),
        ctypes.c_int(_FALLOC_FL_KEEP_SIZE | _FALLOC_FL_PUNCH_HOLE),
        ctypes.c_int64(offset),
        ctypes.c_int64(length),
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def create_file_device(path: Path, size_bytes: int) -> None:
    """Create a sparse device file of ``size_bytes``; refuses to replace an existing one."""
    if size_bytes <= 0:
        raise RequestError(f"device size must be positive, not {size_bytes}")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size_bytes)
    finally:
        os.close(fd)


@asynccontextmanager
async def open_file_device(arg: str) -> AsyncIterator[FileBlockDevice]:
    """Device factory for the FUSE process: ``arg`` is the file's path."""
    dev = FileBlockDevice(Path(arg))
    try:
        yield dev
    finally:
        try:
            await dev.flush()
        finally:
            dev.close()

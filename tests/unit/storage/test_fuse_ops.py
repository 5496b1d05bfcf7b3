"""The FUSE request handlers, called directly (no mount), and the device file they serve."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pyfuse3
import pytest

from edgevisor.errors import ConfigError, NotFound, RequestError
from edgevisor.storage.blockdev import OutOfRange
from edgevisor.storage.filevolume import FileBlockDevice, create_file_device, open_file_device
from edgevisor.storage.fuse_image import (
    IMAGE_NAME,
    ImageOperations,
    resolve_device_factory,
)

SIZE = 1 << 20
ROOT = pyfuse3.ROOT_INODE


class CountingDevice(FileBlockDevice):
    """The file device, counting flushes (the ops must call them at the right moments)."""

    flushes = 0

    async def flush(self) -> None:
        self.flushes += 1
        await super().flush()


@pytest.fixture
def device(tmp_path: Path) -> Iterator[CountingDevice]:
    path = tmp_path / "dev"
    create_file_device(path, SIZE)
    dev = CountingDevice(path)
    yield dev
    dev.close()


async def _image_inode(ops: ImageOperations) -> int:
    attr = await ops.lookup(ROOT, IMAGE_NAME.encode(), None)  # type: ignore[arg-type]
    return attr.st_ino


async def test_lookup_and_getattr_show_one_file_of_device_size(device: CountingDevice) -> None:
    ops = ImageOperations(device, uid=0, gid=0, mode=0o600)
    ino = await _image_inode(ops)
    attr = await ops.getattr(ino, None)  # type: ignore[arg-type]
    assert stat.S_ISREG(attr.st_mode) and attr.st_mode & 0o777 == 0o600
    assert attr.st_size == SIZE
    root = await ops.getattr(ROOT, None)  # type: ignore[arg-type]
    assert stat.S_ISDIR(root.st_mode)
    with pytest.raises(pyfuse3.FUSEError) as exc:
        await ops.lookup(ROOT, b"other", None)  # type: ignore[arg-type]
    assert exc.value.errno == errno.ENOENT


async def test_read_returns_device_bytes_and_stops_at_the_end(device: CountingDevice) -> None:
    await device.write(SIZE - 10, b"0123456789")
    ops = ImageOperations(device)
    fh = (await ops.open(await _image_inode(ops), os.O_RDONLY, None)).fh  # type: ignore[arg-type]
    assert await ops.read(fh, SIZE - 10, 4096) == b"0123456789"
    assert await ops.read(fh, SIZE, 4096) == b""
    assert await ops.read(fh, SIZE + 4096, 10) == b""


async def test_write_reaches_device_and_is_cut_at_the_end(device: CountingDevice) -> None:
    ops = ImageOperations(device)
    fh = (await ops.open(await _image_inode(ops), os.O_RDWR, None)).fh  # type: ignore[arg-type]
    assert await ops.write(fh, 4096, b"abc") == 3
    assert await device.read(4096, 3) == b"abc"
    assert await ops.write(fh, SIZE - 2, b"xyz") == 2  # short write, nothing past the end
    assert await device.read(SIZE - 2, 2) == b"xy"
    assert os.path.getsize(device.path) == SIZE
    with pytest.raises(pyfuse3.FUSEError) as exc:
        await ops.write(fh, SIZE, b"x")
    assert exc.value.errno == errno.ENOSPC


async def test_close_flushes_only_after_writes_and_fsync_always(device: CountingDevice) -> None:
    ops = ImageOperations(device)
    fh = (await ops.open(await _image_inode(ops), os.O_RDWR, None)).fh  # type: ignore[arg-type]
    await ops.read(fh, 0, 10)
    await ops.flush(fh)
    assert device.flushes == 0
    await ops.write(fh, 0, b"d")
    await ops.flush(fh)
    assert device.flushes == 1
    await ops.flush(fh)
    assert device.flushes == 1
    await ops.fsync(fh, True)
    assert device.flushes == 2


async def test_image_size_cannot_change(device: CountingDevice) -> None:
    ops = ImageOperations(device)
    ino = await _image_inode(ops)
    attr = pyfuse3.EntryAttributes()
    attr.st_size = 0
    fields = _SizeFields()
    with pytest.raises(pyfuse3.FUSEError) as exc:
        await ops.setattr(ino, attr, fields, None, None)  # type: ignore[arg-type]
    assert exc.value.errno == errno.EPERM
    with pytest.raises(pyfuse3.FUSEError):
        await ops.open(ino, os.O_RDWR | os.O_TRUNC, None)  # type: ignore[arg-type]


class _SizeFields:
    update_size = True
    update_mode = update_uid = update_gid = False
    update_atime = update_mtime = update_ctime = False


async def test_device_errors_become_eio(device: CountingDevice) -> None:
    class Failing(CountingDevice):
        async def read(self, offset: int, length: int) -> bytes:
            raise OutOfRange("boom")

    dev = Failing(device.path)
    try:
        ops = ImageOperations(dev)
        with pytest.raises(pyfuse3.FUSEError) as exc:
            await ops.read(0, 0, 10)
        assert exc.value.errno == errno.EIO
    finally:
        dev.close()


def test_resolve_device_factory() -> None:
    assert resolve_device_factory("file") is open_file_device
    dotted = "edgevisor.storage.filevolume:open_file_device"
    assert resolve_device_factory(dotted) is open_file_device
    for bad in ("nope", "edgevisor.storage.filevolume:missing", "no.such.module:x"):
        with pytest.raises(ConfigError):
            resolve_device_factory(bad)


# -- the file device ---------------------------------------------------------------------


async def test_file_device_rejects_ranges_past_the_end(device: CountingDevice) -> None:
    with pytest.raises(OutOfRange):
        await device.read(SIZE - 1, 2)
    with pytest.raises(OutOfRange):
        await device.write(SIZE, b"x")
    with pytest.raises(OutOfRange):
        await device.read(-1, 1)
    assert os.path.getsize(device.path) == SIZE


async def test_file_device_zeroes_trim_and_extents(device: CountingDevice) -> None:
    await device.write(0, b"\xff" * 131072, fua=True)
    assert device.allocated(0, 131072) == [(0, 131072, True)]
    await device.write_zeroes(0, 65536)
    assert await device.read(0, 65536) == bytes(65536)
    await device.trim(65536, 65536)
    assert await device.read(65536, 65536) == bytes(65536)
    assert all(not data for _, _, data in device.allocated(0, 131072))
    extents = device.allocated(0, SIZE)
    assert sum(length for _, length, _ in extents) == SIZE
    assert device.present(0, SIZE) == [(0, SIZE, True)]


def test_create_file_device_refuses_to_replace(tmp_path: Path) -> None:
    path = tmp_path / "d"
    create_file_device(path, 4096)
    with pytest.raises(FileExistsError):
        create_file_device(path, 4096)
    with pytest.raises(RequestError):
        create_file_device(tmp_path / "e", 0)
    with pytest.raises(NotFound):
        FileBlockDevice(tmp_path / "missing")

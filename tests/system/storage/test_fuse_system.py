"""The FUSE image process on a real mount: bytes in, bytes out, clean exits."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgevisor.storage.attach import AttachError, AttachSettings, start_fuse, stop_fuse
from edgevisor.storage.filevolume import create_file_device
from edgevisor.storage.fuse_image import IMAGE_NAME
from edgevisor.storage.hostfs import is_mounted, read_mountinfo

pytestmark = pytest.mark.root

SIZE = 256 << 20
SETTINGS = AttachSettings(stop_timeout_s=20.0)


def _pids_mentioning(text: str) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if text.encode() in cmd and b"edgevisor.storage.fuse_image" in cmd:
                out.append(int(entry))
    return out


@pytest.fixture
def work() -> Iterator[Path]:
    """A private directory; every FUSE process and mount in it is gone afterwards."""
    root = Path(tempfile.mkdtemp(prefix=f"evtest-fuse-{os.getpid()}-", dir="/tmp"))
    try:
        yield root
    finally:
        for pid in _pids_mentioning(str(root)):  # only processes this test started
            os.kill(pid, signal.SIGKILL)
        for m in reversed(read_mountinfo()):
            if m.mount_point.startswith(str(root) + "/"):
                subprocess.run(["umount", "-l", m.mount_point], check=False)
        shutil.rmtree(root, ignore_errors=True)


def _device(work: Path) -> Path:
    path = work / "backing"
    create_file_device(path, SIZE)
    with open(path, "r+b") as fh:  # data at the start, the middle and the very end
        for off in (0, SIZE // 2 + 12345, SIZE - 65536):
            fh.seek(off)
            fh.write(os.urandom(65536))
    return path


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@pytest.mark.parametrize("direct_io", [False, True], ids=["page-cache", "direct-io"])
async def test_image_reads_and_writes_the_device(work: Path, direct_io: bool) -> None:
    backing = _device(work)
    settings = SETTINGS.model_copy(update={"fuse_direct_io": direct_io})
    mnt = work / "mnt"
    pid = await start_fuse(
        mnt, kind="file", arg=str(backing), log_path=work / "log", settings=settings
    )
    try:
        image = mnt / IMAGE_NAME
        assert os.listdir(mnt) == [IMAGE_NAME]
        assert image.stat().st_size == SIZE
        assert _sha(image) == _sha(backing)

        data = os.urandom(300_000)
        fd = os.open(image, os.O_RDWR)
        try:
            assert os.pwrite(fd, data, 4096 * 7 + 1) == len(data)
            assert os.pwrite(fd, b"tail-bytes", SIZE - 4) == 4  # cut at the end
            with pytest.raises(OSError) as exc:
                os.pwrite(fd, b"x", SIZE)
            assert exc.value.errno in (errno.ENOSPC, errno.EFBIG)
            os.fsync(fd)
        finally:
            os.close(fd)
        with open(backing, "rb") as fh:
            fh.seek(4096 * 7 + 1)
            assert fh.read(len(data)) == data
            fh.seek(SIZE - 4)
            assert fh.read() == b"tail"
        assert os.path.getsize(backing) == SIZE
        with pytest.raises(OSError):
            os.truncate(image, 4096)
    finally:
        await stop_fuse(mnt, pid, settings=settings)
    assert not is_mounted(str(mnt))
    assert not Path(f"/proc/{pid}").exists()


async def test_sigterm_unmounts_and_exits(work: Path) -> None:
    backing = _device(work)
    mnt = work / "mnt"
    pid = await start_fuse(
        mnt, kind="file", arg=str(backing), log_path=work / "log", settings=SETTINGS
    )
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        pytest.fail("FUSE process ignored SIGTERM")
    assert not is_mounted(str(mnt))


async def test_a_process_that_cannot_start_is_reported(work: Path) -> None:
    mnt = work / "mnt"
    with pytest.raises(AttachError) as exc:
        await start_fuse(
            mnt, kind="file", arg=str(work / "missing"), log_path=work / "log", settings=SETTINGS
        )
    assert "missing" in exc.value.message
    assert not is_mounted(str(mnt))
    assert _pids_mentioning(str(work)) == []

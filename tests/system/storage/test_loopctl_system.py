"""Loop devices by ioctl and mounts by mount(2): same result as the tools, nothing left."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgevisor.storage import loopctl
from edgevisor.storage.filevolume import create_file_device
from edgevisor.storage.hostfs import (
    AttachSettings,
    FilesystemMismatch,
    _has_ext4_superblock,
    detach_loop,
    ensure_filesystem,
    loop_backing_file,
    mount_at,
    mount_filesystem,
    setup_loop,
    unmount_filesystem,
)

pytestmark = pytest.mark.root

SIZE = 32 << 20


def _loops_on(image: Path) -> list[str]:
    out = subprocess.run(
        ["losetup", "--noheadings", "--list", "-O", "NAME,BACK-FILE"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [ln.split()[0] for ln in out.splitlines() if ln.split()[1:] == [str(image)]]


@pytest.fixture
def image() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix=f"evtest-loopctl-{os.getpid()}-", dir="/tmp"))
    img = root / "disk.img"
    create_file_device(img, SIZE)
    try:
        yield img
    finally:
        mnt = str(root / "mnt")
        if mount_at(mnt) is not None:
            subprocess.run(["umount", "-l", mnt], check=False)
        for dev in _loops_on(img):
            subprocess.run(["losetup", "-d", dev], check=False)
        shutil.rmtree(root, ignore_errors=True)


def _sysfs(device: str, attr: str) -> str:
    return Path(f"/sys/block/{os.path.basename(device)}/loop/{attr}").read_text().strip()


def test_ioctl_attach_matches_losetup_and_clears(image: Path) -> None:
    device = loopctl.attach_loop(str(image))
    assert _loops_on(image) == [device]
    assert loop_backing_file(device) == str(image)
    assert _sysfs(device, "autoclear") == "0"  # like losetup: stays until detached
    assert _sysfs(device, "dio") == "0"
    assert loopctl.find_loop(str(image)) == device
    with open(device, "rb") as fh:  # the device really is the file
        assert len(fh.read(4096)) == 4096
    loopctl.clear_loop(device)
    assert loopctl.find_loop(str(image)) is None
    assert _loops_on(image) == []
    loopctl.clear_loop(device)  # idempotent


def test_two_images_get_two_devices(image: Path) -> None:
    other = image.with_name("other.img")
    create_file_device(other, SIZE)
    a = loopctl.attach_loop(str(image))
    try:
        b = loopctl.attach_loop(str(other))
        try:
            assert a != b
            assert loopctl.find_loop(str(other)) == b
        finally:
            loopctl.clear_loop(b)
    finally:
        loopctl.clear_loop(a)
    assert _loops_on(other) == []


def test_find_loop_wants_the_same_file_not_the_same_path(image: Path) -> None:
    device = loopctl.attach_loop(str(image))
    try:
        os.unlink(image)
        create_file_device(image, SIZE)  # same path, another inode
        assert loopctl.find_loop(str(image)) is None
    finally:
        loopctl.clear_loop(device)


@pytest.mark.parametrize("by_ioctl", [True, False], ids=["ioctl", "losetup"])
async def test_setup_and_detach_loop(image: Path, by_ioctl: bool) -> None:
    s = AttachSettings(loop_ioctl=by_ioctl, stop_timeout_s=20.0)
    device = await setup_loop(image, settings=s)
    assert await setup_loop(image, settings=s) == device  # reused, not a second one
    assert _loops_on(image) == [device]
    assert _sysfs(device, "autoclear") == "0"
    await detach_loop(device, settings=s)
    assert _loops_on(image) == []
    await detach_loop(device, settings=s)  # idempotent


@pytest.mark.parametrize("by_syscall", [True, False], ids=["mount2", "mount8"])
async def test_mount_by_syscall_or_tool(image: Path, by_syscall: bool) -> None:
    s = AttachSettings(mount_syscall=by_syscall, mount_options=("noatime",), stop_timeout_s=20.0)
    mnt = image.parent / "mnt"
    device = await setup_loop(image, settings=s)
    try:
        assert await ensure_filesystem(device, settings=s) is True
        await mount_filesystem(device, mnt, settings=s)
        await mount_filesystem(device, mnt, settings=s)  # idempotent
        m = mount_at(str(mnt))
        assert m is not None and m.source == device and m.fstype == "ext4"
        line = next(
            ln for ln in Path("/proc/self/mountinfo").read_text().splitlines()
            if ln.split(" ")[4] == str(mnt)
        )  # fmt: skip
        assert "noatime" in line.split(" ")[5].split(",")
        (mnt / "f").write_text("x")
        await unmount_filesystem(mnt, settings=s)
        assert mount_at(str(mnt)) is None
    finally:
        await detach_loop(device, settings=s)
    assert _loops_on(image) == []


async def test_ext4_is_recognised_without_blkid_and_ext3_is_not_taken_for_it(
    image: Path,
) -> None:
    s = AttachSettings(stop_timeout_s=20.0)
    device = await setup_loop(image, settings=s)
    try:
        assert not _has_ext4_superblock(device)  # empty image
        assert await ensure_filesystem(device, settings=s) is True
        assert _has_ext4_superblock(device)
        assert await ensure_filesystem(device, settings=s) is False
        subprocess.run(["mkfs.ext3", "-q", "-F", device], check=True)
        assert not _has_ext4_superblock(device)  # same magic, no extents: blkid decides
        with pytest.raises(FilesystemMismatch):
            await ensure_filesystem(device, settings=s)
    finally:
        await detach_loop(device, settings=s)
    assert _loops_on(image) == []

"""A volume attach staged without its mount (``AttachedVolume.attach(mount=False)``): the
FUSE process and loop device come up ahead, a later ``attach()`` adopts them and mounts."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from edgevisor.migration.domain import LocalVolumes
from edgevisor.storage.attach import AttachedVolume, AttachSettings
from edgevisor.storage.hostfs import is_mounted, read_mountinfo

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]

SIZE = 32 << 20


@pytest.fixture
async def vols() -> AsyncIterator[LocalVolumes]:
    root = Path(tempfile.mkdtemp(prefix=f"evtest-stg-{os.getpid()}-", dir="/tmp"))
    v = LocalVolumes(root / "volumes", AttachSettings(stop_timeout_s=20.0))
    try:
        yield v
    finally:
        with contextlib.suppress(Exception):
            await v.clear_stale()
        for m in reversed(read_mountinfo()):
            if m.mount_point.startswith(str(root) + "/"):
                subprocess.run(["umount", "-l", m.mount_point], check=False)
        shutil.rmtree(root, ignore_errors=True)


def _attachment(vols: LocalVolumes, vid: str, target: Path) -> AttachedVolume:
    return AttachedVolume(
        vid, state_dir=vols.attach_dir, target=target, kind="volume",
        arg=str(vols.root / vid), settings=vols.settings,
    )  # fmt: skip


async def test_staged_attach_then_mount_adopts_the_layers(vols: LocalVolumes) -> None:
    await vols.create("v", SIZE, account="acme")
    target = vols.root / "mnt"
    target.mkdir()
    av = _attachment(vols, "acme.v", target)
    assert await av.attach(mount=False) is False
    pid, loop = av.pid, av.loop_device
    assert pid is not None and loop is not None
    assert is_mounted(str(av.fuse_dir)) and not is_mounted(str(target))
    assert set(av.timings) == {"fuse", "loop"}

    # A new object (as after the volume's owner picks it up) adopts both layers.
    again = _attachment(vols, "acme.v", target)
    assert await again.attach() is True  # the first mount creates the filesystem
    assert (again.pid, again.loop_device) == (pid, loop)
    assert is_mounted(str(target))
    assert "fuse" not in again.timings and {"loop", "fs", "mount"} <= set(again.timings)
    (target / "f").write_text("x")

    await again.detach()
    assert not is_mounted(str(target)) and not is_mounted(str(again.fuse_dir))
    assert again.loop_device is None


async def test_staged_attach_is_torn_down_by_detach(vols: LocalVolumes) -> None:
    await vols.create("w", SIZE, account="acme")
    target = vols.root / "mnt-w"
    target.mkdir()
    av = _attachment(vols, "acme.w", target)
    await av.attach(mount=False)
    loop = av.loop_device
    assert loop is not None
    await av.detach()
    assert not is_mounted(str(av.fuse_dir))
    backing = Path(f"/sys/block/{os.path.basename(loop)}/loop/backing_file")
    assert not backing.exists() or str(av.image) not in backing.read_text()


# -- the switch's mount of a staged attachment ------------------------------------------
# ``attach(mount=False)`` then ``attach()`` on the same object goes straight to the
# filesystem (no statfs probe of the FUSE process, no loop-device scan), and falls back to
# the full path when a staged layer went away.


async def _formatted(vols: LocalVolumes, name: str, target: Path) -> None:
    """A volume with ext4 and one file on it, detached again."""
    await vols.create(name, SIZE, account="acme")
    target.mkdir()
    av = _attachment(vols, f"acme.{name}", target)
    await av.attach()
    (target / "kept").write_text("data")
    await av.detach()


async def test_switch2_staged_mount_skips_probe_and_loop_scan(vols: LocalVolumes) -> None:
    target = vols.root / "mnt"
    await _formatted(vols, "v", target)
    av = _attachment(vols, "acme.v", target)
    await av.attach(mount=False)
    pid, loop = av.pid, av.loop_device
    assert pid is not None and loop is not None and not is_mounted(str(target))

    assert await av.attach() is False  # the filesystem was there
    # no "loop" (no scan, no losetup), no "fs" (the mount reads the superblock itself)
    assert set(av.timings) == {"adopt", "mount"}
    assert (av.pid, av.loop_device) == (pid, loop)
    assert (target / "kept").read_text() == "data"
    (target / "new").write_text("x")
    await av.detach()
    assert not is_mounted(str(target)) and not is_mounted(str(av.fuse_dir))

    # once mounted (and detached), the next attach is a full one again
    await av.attach()
    assert "adopt" not in av.timings and (target / "new").read_text() == "x"
    await av.detach()


async def test_switch2_staged_mount_without_filesystem_creates_it(vols: LocalVolumes) -> None:
    # a staged volume that never had a filesystem: the direct mount fails, the full path
    # runs mkfs (as an attach without staging would)
    await vols.create("e", SIZE, account="acme")
    target = vols.root / "mnt-e"
    target.mkdir()
    av = _attachment(vols, "acme.e", target)
    await av.attach(mount=False)
    assert await av.attach() is True
    assert is_mounted(str(target)) and "fs" in av.timings
    (target / "f").write_text("y")
    await av.detach()
    assert not is_mounted(str(target))


async def test_switch2_staged_mount_after_fuse_died_reattaches(vols: LocalVolumes) -> None:
    target = vols.root / "mnt-d"
    await _formatted(vols, "d", target)
    av = _attachment(vols, "acme.d", target)
    await av.attach(mount=False)
    old_pid = av.pid
    assert old_pid is not None
    os.kill(old_pid, signal.SIGKILL)
    end = time.monotonic() + 30
    while Path(f"/proc/{old_pid}").exists():
        with contextlib.suppress(ChildProcessError):
            os.waitpid(old_pid, os.WNOHANG)
        assert time.monotonic() < end
        time.sleep(0.02)

    await av.attach()  # the stale layers are cleared and built again
    assert "adopt" not in av.timings and "fuse" in av.timings
    assert av.pid not in (None, old_pid)
    assert (target / "kept").read_text() == "data"
    await av.detach()
    assert not is_mounted(str(target))

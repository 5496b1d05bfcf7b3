"""A volume attach staged without its mount (``AttachedVolume.attach(mount=False)``): the
FUSE process and loop device come up ahead, a later ``attach()`` adopts them and mounts."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
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

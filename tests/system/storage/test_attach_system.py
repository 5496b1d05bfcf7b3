"""A volume exposed as ext4 through FUSE + loop: files survive detach, crashes are cleared."""

from __future__ import annotations

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

from edgevisor.storage.attach import (
    AttachedVolume,
    AttachSettings,
    FilesystemMismatch,
    probe_fuse_mount,
    recover_stale,
)
from edgevisor.storage.filevolume import create_file_device
from edgevisor.storage.hostfs import parse_losetup_json, read_mountinfo

pytestmark = pytest.mark.root

SIZE = 256 << 20
SETTINGS = AttachSettings(stop_timeout_s=20.0)


def _loops_under(root: str, fuse_devs: set[str]) -> list[str]:
    out = subprocess.run(
        ["losetup", "--json", "--list", "-O", "NAME,MAJ:MIN,BACK-FILE,BACK-MAJ:MIN"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [
        e.device
        for e in parse_losetup_json(out)
        if e.backing_file.startswith(root + "/") or e.backing_dev in fuse_devs
    ]


def _our_mounts(root: str) -> list[str]:
    return [m.mount_point for m in read_mountinfo() if m.mount_point.startswith(root + "/")]


def _fuse_pids(root: str) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if root.encode() in cmd and b"edgevisor.storage.fuse_image" in cmd:
                out.append(int(entry))
    return out


class Leftovers:
    def __init__(self, root: Path) -> None:
        self.root = str(root)
        self.fuse_devs: set[str] = set()

    def remember(self) -> None:
        """Note the FUSE connections in use, to find loop devices on them after a crash."""
        for m in read_mountinfo():
            if m.mount_point.startswith(self.root + "/") and m.fstype.startswith("fuse"):
                self.fuse_devs.add(m.dev)

    def now(self) -> tuple[list[str], list[str], list[int]]:
        return (
            _our_mounts(self.root),
            _loops_under(self.root, self.fuse_devs),
            _fuse_pids(self.root),
        )


@pytest.fixture
def work() -> Iterator[tuple[Path, Leftovers]]:
    """A private directory; its mounts, loop devices and FUSE processes go, pass or fail."""
    root = Path(tempfile.mkdtemp(prefix=f"evtest-attach-{os.getpid()}-", dir="/tmp"))
    left = Leftovers(root)
    try:
        yield root, left
    finally:
        left.remember()
        for pid in _fuse_pids(str(root)):  # only processes this test started
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
        loops = _loops_under(str(root), left.fuse_devs)
        for m in reversed(read_mountinfo()):
            if m.mount_point.startswith(str(root) + "/") or m.source in loops:
                subprocess.run(["umount", "-l", m.mount_point], check=False)
        for dev in loops:
            subprocess.run(["losetup", "-d", dev], check=False)
        shutil.rmtree(root, ignore_errors=True)


def _volume(root: Path, backing: Path, name: str = "vol") -> AttachedVolume:
    return AttachedVolume(
        name,
        state_dir=root / "state",
        target=root / "mnt",
        kind="file",
        arg=str(backing),
        settings=SETTINGS,
    )


def _write_files(mnt: Path) -> dict[str, str]:
    sums = {}
    for name, size in (("small.txt", 17), ("one.bin", 1 << 20), ("sub/eight.bin", 8 << 20)):
        path = mnt / name
        path.parent.mkdir(exist_ok=True)
        data = os.urandom(size)
        with open(path, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        sums[name] = hashlib.sha256(data).hexdigest()
    return sums


def _read_sums(mnt: Path, names: dict[str, str]) -> dict[str, str]:
    return {n: hashlib.sha256((mnt / n).read_bytes()).hexdigest() for n in names}


async def test_files_survive_detach_and_reattach(work: tuple[Path, Leftovers]) -> None:
    root, left = work
    backing = root / "backing"
    create_file_device(backing, SIZE)
    vol = _volume(root, backing)

    assert await vol.attach() is True  # a fresh image gets a filesystem
    left.remember()
    mounts = {m.mount_point: m for m in read_mountinfo()}
    assert mounts[str(root / "mnt")].fstype == "ext4"
    assert mounts[str(root / "mnt")].source == vol.loop_device
    sums = _write_files(root / "mnt")
    assert _read_sums(root / "mnt", sums) == sums

    await vol.detach()
    assert left.now() == ([], [], [])
    assert not (root / "mnt" / "small.txt").exists()

    again = _volume(root, backing)
    assert await again.attach() is False  # the filesystem is found, not recreated
    assert _read_sums(root / "mnt", sums) == sums
    await again.detach()
    assert left.now() == ([], [], [])


async def test_attach_and_detach_are_idempotent(work: tuple[Path, Leftovers]) -> None:
    root, left = work
    backing = root / "backing"
    create_file_device(backing, SIZE)
    vol = _volume(root, backing)
    await vol.attach()
    left.remember()
    first = (vol.pid, vol.loop_device, left.now())
    await vol.attach()
    # a second object for the same name adopts the running attachment
    other = _volume(root, backing)
    await other.attach()
    assert (other.pid, other.loop_device, left.now()) == first
    assert len(first[2][0]) == 2  # the FUSE mount and the ext4 mount, nothing doubled
    await other.detach()
    await other.detach()
    await vol.detach()
    assert left.now() == ([], [], [])


async def test_kill9_of_fuse_process_is_recovered(work: tuple[Path, Leftovers]) -> None:
    root, left = work
    backing = root / "backing"
    create_file_device(backing, SIZE)
    vol = _volume(root, backing)
    await vol.attach()
    left.remember()
    sums = _write_files(root / "mnt")
    assert vol.pid is not None
    os.kill(vol.pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while await probe_fuse_mount(vol.fuse_dir) != "dead":
        assert time.monotonic() < deadline, "FUSE mount did not go stale"
        time.sleep(0.05)
    mounts, loops, _ = left.now()
    assert len(mounts) == 2 and len(loops) == 1  # what a crash leaves behind

    report = await recover_stale(root / "state", settings=SETTINGS)
    assert report.unmounted == [str(root / "mnt")]
    assert report.detached_loops == loops
    assert report.cleared_fuse == [str(vol.fuse_dir)]
    assert left.now() == ([], [], [])
    assert not (await recover_stale(root / "state", settings=SETTINGS)).changed

    again = _volume(root, backing)
    assert await again.attach() is False
    assert _read_sums(root / "mnt", sums) == sums  # fsync'ed before the crash: durable
    await again.detach()
    assert left.now() == ([], [], [])


async def test_attach_after_a_crash_clears_the_remains_itself(
    work: tuple[Path, Leftovers],
) -> None:
    root, left = work
    backing = root / "backing"
    create_file_device(backing, SIZE)
    vol = _volume(root, backing)
    await vol.attach()
    left.remember()
    sums = _write_files(root / "mnt")
    assert vol.pid is not None
    os.kill(vol.pid, signal.SIGKILL)
    while Path(f"/proc/{vol.pid}").exists():
        os.waitpid(vol.pid, os.WNOHANG)
        time.sleep(0.05)

    again = _volume(root, backing)
    await again.attach()
    assert _read_sums(root / "mnt", sums) == sums
    # The crashed attachment's loop device is detached with autoclear: the kernel frees it
    # once its lazily unmounted filesystem lets go, which may be a moment after attach().
    deadline = time.monotonic() + 30
    while True:
        mounts, loops, pids = left.now()
        if len(loops) <= 1 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert len(mounts) == 2 and len(loops) == 1 and pids == [again.pid]
    await again.detach()
    assert left.now() == ([], [], [])


async def test_a_foreign_filesystem_is_never_reformatted(work: tuple[Path, Leftovers]) -> None:
    root, left = work
    backing = root / "backing"
    create_file_device(backing, SIZE)
    subprocess.run(["mkswap", str(backing)], check=True, capture_output=True)
    vol = _volume(root, backing)
    with pytest.raises(FilesystemMismatch):
        await vol.attach()
    assert left.now() == ([], [], [])  # a failed attach takes its layers down again
    found = subprocess.run(
        ["blkid", "-p", "-o", "value", "-s", "TYPE", str(backing)],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    assert found == "swap"


async def test_a_real_volume_plugs_in(work: tuple[Path, Leftovers]) -> None:
    from edgevisor.storage.volume import Volume

    root, left = work
    Volume.create(root / "volume", SIZE).close()
    vol = AttachedVolume(
        "real",
        state_dir=root / "state",
        target=root / "mnt",
        kind="volume",
        arg=str(root / "volume"),
        settings=SETTINGS,
    )
    assert await vol.attach() is True
    left.remember()
    sums = _write_files(root / "mnt")
    await vol.detach()
    assert left.now() == ([], [], [])
    assert await vol.attach() is False
    assert _read_sums(root / "mnt", sums) == sums
    await vol.detach()
    assert left.now() == ([], [], [])


async def test_detach_after_kill9_clears_everything(work: tuple[Path, Leftovers]) -> None:
    root, left = work
    backing = root / "backing"
    create_file_device(backing, SIZE)
    vol = _volume(root, backing)
    await vol.attach()
    left.remember()
    assert vol.pid is not None
    os.kill(vol.pid, signal.SIGKILL)
    await vol.detach()
    assert left.now() == ([], [], [])
    assert not (root / "state" / "vol" / "state.json").exists()


async def test_a_hung_fuse_process_is_killed_and_cleared(work: tuple[Path, Leftovers]) -> None:
    root, left = work
    backing = root / "backing"
    create_file_device(backing, SIZE)
    vol = _volume(root, backing)
    await vol.attach()
    left.remember()
    pid = vol.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # alive, but answers nothing
    try:
        settings = SETTINGS.model_copy(update={"probe_timeout_s": 1.0})
        assert await probe_fuse_mount(vol.fuse_dir, timeout_s=1.0) == "hung"
        report = await recover_stale(root / "state", settings=settings)
    finally:
        if Path(f"/proc/{pid}").exists():
            os.kill(pid, signal.SIGCONT)
    assert report.killed == [pid]
    assert report.cleared_fuse == [str(vol.fuse_dir)]
    assert left.now() == ([], [], [])


async def test_the_filesystem_can_be_mounted_in_another_mount_namespace(
    work: tuple[Path, Leftovers],
) -> None:
    root, left = work
    backing = root / "backing"
    create_file_device(backing, SIZE)
    holder = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sleep", "300"])
    try:
        ns = Path(f"/proc/{holder.pid}/ns/mnt")
        deadline = time.monotonic() + 30
        while os.readlink(ns) == os.readlink("/proc/self/ns/mnt"):
            assert time.monotonic() < deadline, "unshare did not start"
            time.sleep(0.02)
        vol = AttachedVolume(
            "nsvol",
            state_dir=root / "state",
            target=root / "inside",
            kind="file",
            arg=str(backing),
            settings=SETTINGS,
            mount_ns=ns,
        )
        await vol.attach()
        left.remember()
        assert str(root / "inside") not in _our_mounts(str(root))  # not in our namespace
        inside = subprocess.run(
            [
                "nsenter",
                f"--mount={ns}",
                "findmnt",
                "-n",
                "-o",
                "SOURCE,FSTYPE",
                str(root / "inside"),
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        assert inside == [vol.loop_device, "ext4"]
        await vol.attach()  # idempotent there too
        await vol.detach()
        gone = subprocess.run(
            ["nsenter", f"--mount={ns}", "findmnt", "-n", str(root / "inside")],
            capture_output=True,
            check=False,
        )
        assert gone.returncode != 0
        assert left.now() == ([], [], [])
    finally:
        holder.kill()
        holder.wait()

"""Spare FUSE processes: attaches use them, owners kill them, recovery never mistakes them."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgevisor.storage.attach import (
    AttachedVolume,
    AttachSettings,
    _is_fuse_image_process,
    _pid_alive,
    recover_stale,
)
from edgevisor.storage.filevolume import create_file_device
from edgevisor.storage.fuse_spare import SpareFuse, holds_dev_fuse
from edgevisor.storage.hostfs import read_mountinfo

pytestmark = pytest.mark.root

SIZE = 64 << 20
SETTINGS = AttachSettings(stop_timeout_s=20.0, fuse_spare_refill_delay_s=0.0)


class Work:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.pids: set[int] = set()  # every FUSE/spare/owner process this test started
        self.pools: list[SpareFuse] = []

    def pool(self) -> SpareFuse:
        p = SpareFuse(settings=SETTINGS)
        self.pools.append(p)
        return p

    def volume(self, name: str, spares: SpareFuse | None) -> AttachedVolume:
        backing = self.root / f"{name}.img"
        create_file_device(backing, SIZE)
        return AttachedVolume(
            name,
            state_dir=self.root / "state",
            target=self.root / "mnt" / name,
            kind="file",
            arg=str(backing),
            settings=SETTINGS,
            spares=spares,
        )


def _our_loops(root: str) -> list[str]:
    out = subprocess.run(
        ["losetup", "--noheadings", "--list", "-O", "NAME,BACK-FILE"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [ln.split()[0] for ln in out.splitlines() if root + "/" in ln]


@pytest.fixture
def work() -> Iterator[Work]:
    """A private directory; its pools, processes, mounts and loop devices go, pass or fail."""
    root = Path(tempfile.mkdtemp(prefix=f"evtest-spare-{os.getpid()}-", dir="/tmp"))
    w = Work(root)
    try:
        yield w
    finally:
        for p in w.pools:
            if p.pid is not None:
                w.pids.add(p.pid)
            p.close()
        loops = _our_loops(str(root))
        for m in reversed(read_mountinfo()):
            if m.mount_point.startswith(str(root) + "/") and not m.fstype.startswith("fuse"):
                subprocess.run(["umount", "-l", m.mount_point], check=False)
        for dev in loops:
            subprocess.run(["losetup", "-d", dev], check=False)
        for pid in w.pids:  # only processes this test started
            if _pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        for m in reversed(read_mountinfo()):
            if m.mount_point.startswith(str(root) + "/"):
                subprocess.run(["umount", "-l", m.mount_point], check=False)
        shutil.rmtree(root, ignore_errors=True)


async def _wait_for(cond: object, what: str, timeout_s: float = 60.0) -> None:
    assert callable(cond)
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def _gone(pid: int) -> bool:
    return not _pid_alive(pid)


async def test_attaches_use_the_spare_and_the_pool_refills(work: Work) -> None:
    pool = work.pool()
    pool.start()
    first = pool.pid
    assert first is not None
    work.pids.add(first)
    assert not _is_fuse_image_process(first)  # waiting: serves no mount

    a = work.volume("a", pool)
    await a.attach()
    assert a.pid == first  # the spare serves the mount: no fresh interpreter
    assert pool.taken == 1
    assert holds_dev_fuse(first) and _is_fuse_image_process(first)
    (a.target / "hello").write_text("from the spare")
    assert "serving" in a.log_path.read_text()  # the spare logs into the volume's log

    await _wait_for(lambda: pool.pid is not None, "the refilled spare")
    second = pool.pid
    assert second is not None and second != first
    work.pids.add(second)
    b = work.volume("b", pool)
    await b.attach()
    assert b.pid == second
    assert pool.taken == 2

    await a.detach()
    await b.detach()
    assert _gone(first) and _gone(second)
    await a.attach()  # re-attach of the same data through the next spare
    assert (a.target / "hello").read_text() == "from the spare"
    assert a.pid is not None
    work.pids.add(a.pid)
    await a.detach()
    assert _our_loops(str(work.root)) == []
    pool.close()


async def test_without_a_spare_attach_starts_a_fresh_process(work: Work) -> None:
    pool = work.pool()  # never started: the first attach cannot find a spare
    vol = work.volume("v", pool)
    await vol.attach()
    assert vol.pid is not None
    work.pids.add(vol.pid)
    assert pool.taken == 0
    assert str(vol.fuse_dir).encode() in Path(f"/proc/{vol.pid}/cmdline").read_bytes()
    await vol.detach()
    pool.close()


async def test_a_dead_spare_is_replaced_by_a_fresh_process(work: Work) -> None:
    pool = work.pool()
    pool.start()
    spare = pool.pid
    assert spare is not None
    work.pids.add(spare)
    os.kill(spare, signal.SIGKILL)
    await _wait_for(lambda: _gone(spare), "the spare to die")
    vol = work.volume("v", pool)
    await vol.attach()
    assert vol.pid is not None and vol.pid != spare
    work.pids.add(vol.pid)
    await vol.detach()
    pool.close()


async def test_close_kills_the_spare_and_stops_refills(work: Work) -> None:
    pool = work.pool()
    pool.start()
    spare = pool.pid
    assert spare is not None
    work.pids.add(spare)
    pool.schedule_refill(0.0)
    pool.close()
    assert _gone(spare)
    await asyncio.sleep(0.2)
    assert pool.pid is None and pool.spawned == 1
    pool.start()  # closed: nothing starts again
    assert pool.pid is None


async def test_recovery_never_takes_a_spare_for_a_mount(work: Work) -> None:
    pool = work.pool()
    pool.start()
    spare = pool.pid
    assert spare is not None
    work.pids.add(spare)
    # a state file naming the spare, next to a dead FUSE mount: recovery clears the
    # mount but must not kill a process that serves nothing
    st = work.root / "state" / "ghost"
    (st / "fuse").mkdir(parents=True)
    (st / "state.json").write_text(json.dumps({"pid": spare, "kind": "file", "arg": "x"}))
    report = await recover_stale(work.root / "state", settings=SETTINGS)
    assert spare not in report.killed
    assert not _is_fuse_image_process(spare)
    assert _pid_alive(spare)
    assert pool.take() is not None  # still a usable spare
    pool.close()


_OWNER = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from edgevisor.storage.attach import AttachedVolume, AttachSettings
    from edgevisor.storage.fuse_spare import SpareFuse

    async def main() -> None:
        root = Path(sys.argv[1])
        s = AttachSettings(stop_timeout_s=20.0, fuse_spare_refill_delay_s=0.0)
        pool = SpareFuse(settings=s)
        pool.start()
        vol = AttachedVolume("v", state_dir=root / "state", target=root / "mnt",
                             kind="file", arg=str(root / "v.img"), settings=s, spares=pool)
        await vol.attach()
        while pool.pid is None:
            await asyncio.sleep(0.05)
        print(vol.pid, pool.pid, flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())
    """
)


async def test_spare_dies_with_its_owner_and_a_served_mount_survives(work: Work) -> None:
    create_file_device(work.root / "v.img", SIZE)
    owner = subprocess.Popen(
        [sys.executable, "-c", _OWNER, str(work.root)], stdout=subprocess.PIPE, text=True
    )
    work.pids.add(owner.pid)
    try:
        assert owner.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(owner.stdout.readline), 90)
        served, spare = (int(x) for x in line.split())
        work.pids.update((served, spare))
    finally:
        owner.kill()
        owner.wait()
    await _wait_for(lambda: _gone(spare), "the spare to die with its owner")
    await asyncio.sleep(0.5)
    assert _pid_alive(served)  # PDEATHSIG was cleared once it served a mount
    (work.root / "mnt" / "still-there").write_text("yes")
    vol = AttachedVolume(
        "v",
        state_dir=work.root / "state",
        target=work.root / "mnt",
        kind="file",
        arg=str(work.root / "v.img"),
        settings=SETTINGS,
    )
    assert vol.pid == served
    await vol.detach()
    assert _gone(served)
    assert _our_loops(str(work.root)) == []

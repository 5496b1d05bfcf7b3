"""cgroup v1 groups of an environment against the real kernel: limits, kill, OOM, removal."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from edgevisor.tasks.cgroups import (
    CONTROLLERS,
    CgroupError,
    CgroupLimits,
    CgroupSet,
    cgroups_available,
    sweep_orphans,
)

pytestmark = pytest.mark.root


@pytest.fixture
def group() -> Iterator[CgroupSet]:
    cg = CgroupSet(f"test-cg-{os.getpid()}-{time.monotonic_ns()}")
    try:
        yield cg
    finally:
        cg.remove()
        for path in cg.paths.values():
            assert not path.exists()


def sleeper(cg: CgroupSet) -> subprocess.Popen[bytes]:
    # The child blocks on stdin until it is in the group, so its children are limited too.
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; sys.stdin.read(1); time.sleep(60)"],
        stdin=subprocess.PIPE,
    )
    cg.add(proc.pid)
    assert proc.stdin is not None
    proc.stdin.write(b"go")
    proc.stdin.flush()
    return proc


def test_available_here() -> None:
    assert cgroups_available()


def test_limits_are_written(group: CgroupSet) -> None:
    group.create(CgroupLimits(memory_mb=64, pids_max=10, cpu=0.25))
    mem = group.paths["memory"]
    assert int((mem / "memory.limit_in_bytes").read_text()) == 64 * 1024 * 1024
    if (mem / "memory.memsw.limit_in_bytes").exists():
        assert int((mem / "memory.memsw.limit_in_bytes").read_text()) == 64 * 1024 * 1024
    assert (group.paths["pids"] / "pids.max").read_text().strip() == "10"
    assert int((group.paths["cpu"] / "cpu.cfs_quota_us").read_text()) == 25000
    assert int((group.paths["cpu"] / "cpu.cfs_period_us").read_text()) == 100000
    assert group.oom().oom_kills == 0 and not group.oom().oom_killed


def test_unlimited_cpu_leaves_quota_alone(group: CgroupSet) -> None:
    group.create(CgroupLimits(memory_mb=64, pids_max=10, cpu=0))
    assert int((group.paths["cpu"] / "cpu.cfs_quota_us").read_text()) == -1


def test_add_kill_all_and_remove(group: CgroupSet) -> None:
    group.create(CgroupLimits(memory_mb=64, pids_max=10, cpu=1.0))
    proc = sleeper(group)
    try:
        assert group.pids() == [proc.pid]
        for c in CONTROLLERS:
            assert str(proc.pid) in (group.paths[c] / "cgroup.procs").read_text().split()
        group.kill_all()
        assert proc.wait(timeout=10) == -9
        assert group.pids() == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_remove_kills_what_is_left(group: CgroupSet) -> None:
    group.create(CgroupLimits(memory_mb=64, pids_max=10, cpu=1.0))
    proc = sleeper(group)
    group.remove()
    assert proc.wait(timeout=10) == -9
    for path in group.paths.values():
        assert not path.exists()
    group.remove()  # idempotent


def test_memory_limit_oom_kills_and_is_counted(group: CgroupSet) -> None:
    group.create(CgroupLimits(memory_mb=32, pids_max=10, cpu=1.0))
    proc = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; sys.stdin.read(1); x = [bytearray(1 << 20) for _ in range(200)]"],
        stdin=subprocess.PIPE,
    )
    try:
        group.add(proc.pid)
        assert proc.stdin is not None
        proc.stdin.write(b"go")
        proc.stdin.close()
        assert proc.wait(timeout=30) == -9
        report = group.oom()
        assert report.oom_killed and report.oom_kills >= 1
        # memory.failcnt stays 0 on this kernel (6.18) even after an OOM kill: not asserted.
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_pids_limit_makes_fork_fail(group: CgroupSet) -> None:
    group.create(CgroupLimits(memory_mb=64, pids_max=3, cpu=1.0))
    code = (
        "import os, sys, time\n"
        "sys.stdin.read(1)\n"
        "n = 0\n"
        "try:\n"
        "    for _ in range(20):\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(5); os._exit(0)\n"
        "        n += 1\n"
        "except BlockingIOError:\n"
        "    print(n, 'EAGAIN'); sys.stdout.flush(); os._exit(0)\n"
        "print(n, 'unlimited')\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)
    try:
        group.add(proc.pid)
        out, _ = proc.communicate(b"g", timeout=30)
        assert out.split() == [b"2", b"EAGAIN"]
    finally:
        group.kill_all()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_existing_group_is_an_error_and_left_intact(group: CgroupSet) -> None:
    group.create(CgroupLimits(memory_mb=64, pids_max=10, cpu=1.0))
    twin = CgroupSet(group.name)
    with pytest.raises(CgroupError, match="already exists"):
        twin.create(CgroupLimits(memory_mb=16, pids_max=1, cpu=1.0))
    assert int((group.paths["memory"] / "memory.limit_in_bytes").read_text()) == 64 << 20
    for path in group.paths.values():
        assert path.exists()


def test_bad_names_are_refused() -> None:
    for name in ("", "a/b", "..", "."):
        with pytest.raises(ValueError):
            CgroupSet(name)


def test_limits_can_be_raised_and_lowered_later(group: CgroupSet) -> None:
    group.create(CgroupLimits(memory_mb=64, pids_max=10, cpu=1.0))
    mem = group.paths["memory"]
    for mb in (256, 32, 128):
        group.set_limits(CgroupLimits(memory_mb=mb, pids_max=mb, cpu=0))
        assert int((mem / "memory.limit_in_bytes").read_text()) == mb << 20
        if (mem / "memory.memsw.limit_in_bytes").exists():
            assert int((mem / "memory.memsw.limit_in_bytes").read_text()) == mb << 20
        assert (group.paths["pids"] / "pids.max").read_text().strip() == str(mb)
        assert int((group.paths["cpu"] / "cpu.cfs_quota_us").read_text()) == -1


def test_sweep_removes_groups_of_dead_agents_only(group: CgroupSet) -> None:
    group.create(CgroupLimits(memory_mb=64, pids_max=10, cpu=1.0))  # ours: agent alive
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = CgroupSet(f"task-{dead.pid}-1-abcdef")
    orphan.create(CgroupLimits(memory_mb=64, pids_max=10, cpu=1.0))
    proc = sleeper(orphan)
    try:
        alive_name = f"task-{os.getpid()}-2-abcdef"
        alive = CgroupSet(alive_name)
        alive.create(CgroupLimits(memory_mb=64, pids_max=10, cpu=1.0))
        try:
            removed = sweep_orphans()
            assert orphan.name in removed
            assert alive_name not in removed
            assert proc.wait(timeout=10) == -9
            assert all(not p.exists() for p in orphan.paths.values())
            assert all(p.exists() for p in alive.paths.values())
        finally:
            alive.remove()
    finally:
        orphan.remove()
        if proc.poll() is None:
            proc.kill()
            proc.wait()

"""cgroup v1 groups for execution environments: limits, membership, OOM reading, kill, removal.

One :class:`CgroupSet` is one environment: a directory ``edgevisor/<name>`` under each of
the ``memory``, ``pids``, ``cpu`` and ``freezer`` hierarchies of ``/sys/fs/cgroup``. (This
host's unified hierarchy has no memory/pids controllers, so v2 is not an option here.)

Killing goes through the freezer: freeze, SIGKILL every member, thaw. A frozen group cannot
fork between the listing and the kill, so nothing escapes. After the last process exits
``rmdir`` can stay busy for a few tens of milliseconds; :meth:`CgroupSet.remove` retries.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from edgevisor.errors import EdgevisorError

__all__ = [
    "CONTROLLERS",
    "CgroupError",
    "CgroupLimits",
    "CgroupSet",
    "CgroupUnavailable",
    "OomReport",
    "cgroups_available",
    "sweep_orphans",
]

CGROUP_ROOT = Path("/sys/fs/cgroup")
CONTROLLERS = ("memory", "pids", "cpu", "freezer")
PARENT = "edgevisor"
CPU_PERIOD_US = 100_000


class CgroupError(EdgevisorError):
    """A cgroup operation failed (the kernel refused a write, or a group stayed busy)."""


class CgroupUnavailable(CgroupError):
    """cgroup v1 controllers are not mounted or not writable here (not root?)."""


@dataclass(frozen=True)
class CgroupLimits:
    memory_mb: int
    pids_max: int
    cpu: float  # share of one core; 0 or less means unlimited


@dataclass(frozen=True)
class OomReport:
    oom_kills: int  # processes the kernel OOM-killed in this group
    failcnt: int  # times an allocation hit the limit (kernel 6.18 leaves it at 0; informative)

    @property
    def oom_killed(self) -> bool:
        return self.oom_kills > 0


def cgroups_available(root: Path = CGROUP_ROOT) -> bool:
    """True when every controller we need is a writable cgroup v1 hierarchy."""
    return all(
        (root / c / "cgroup.procs").exists() and os.access(root / c, os.W_OK) for c in CONTROLLERS
    )


def _write(path: Path, value: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError as exc:
        raise CgroupError(f"cannot write {value!r} to {path}: {exc.strerror}") from exc


class CgroupSet:
    """The cgroups of one environment. ``create`` first; ``remove`` always (idempotent)."""

    def __init__(self, name: str, root: Path = CGROUP_ROOT) -> None:
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"bad cgroup name {name!r}")
        self.name = name
        self.root = root
        self.paths = {c: root / c / PARENT / name for c in CONTROLLERS}
        self.memory_limit_bytes = 0

    def create(self, limits: CgroupLimits) -> None:
        """Make the groups and set the limits; on any failure nothing is left behind."""
        if not cgroups_available(self.root):
            raise CgroupUnavailable("cgroup v1 memory/pids/cpu/freezer are not writable here")
        for path in self.paths.values():
            try:
                path.mkdir(parents=True, exist_ok=False)
            except FileExistsError as exc:
                # Someone else's group: undo only the ones made here.
                for made in self.paths.values():
                    if made == path:
                        break
                    with contextlib.suppress(OSError):
                        made.rmdir()
                raise CgroupError(f"cgroup {self.name!r} already exists") from exc
            except OSError as exc:
                self.remove()
                raise CgroupError(f"cannot create {path}: {exc.strerror}") from exc
        try:
            self.set_limits(limits)
        except BaseException:
            self.remove()
            raise

    def set_limits(self, limits: CgroupLimits) -> None:
        """Write the limits (also later, when a prewarmed environment gets its task)."""
        mem = self.paths["memory"]
        new = limits.memory_mb * 1024 * 1024
        memsw = mem / "memory.memsw.limit_in_bytes"
        # memsw (memory + swap) may never be below memory: raise it first, lower it last.
        # Equal to the memory limit, so the task cannot push its excess to swap.
        order = ["memory.limit_in_bytes", "memory.memsw.limit_in_bytes"]
        if new > int((mem / "memory.limit_in_bytes").read_text()):
            order.reverse()
        for name in order:
            if name == "memory.limit_in_bytes" or memsw.exists():
                _write(mem / name, str(new))
        self.memory_limit_bytes = new
        _write(self.paths["pids"] / "pids.max", str(limits.pids_max))
        cpu = self.paths["cpu"]
        if limits.cpu > 0:
            _write(cpu / "cpu.cfs_period_us", str(CPU_PERIOD_US))
            _write(cpu / "cpu.cfs_quota_us", str(max(1000, int(limits.cpu * CPU_PERIOD_US))))
        else:
            _write(cpu / "cpu.cfs_quota_us", "-1")

    def add(self, pid: int) -> None:
        """Move ``pid`` into every group (its later children inherit them)."""
        for path in self.paths.values():
            _write(path / "cgroup.procs", str(pid))

    def pids(self) -> list[int]:
        try:
            text = (self.paths["freezer"] / "cgroup.procs").read_text()
        except FileNotFoundError:
            return []
        return [int(p) for p in text.split()]

    def oom(self) -> OomReport:
        """The OOM counters of the memory group (zeros once the group is gone)."""
        mem = self.paths["memory"]
        kills = 0
        failcnt = 0
        with contextlib.suppress(FileNotFoundError):
            for line in (mem / "memory.oom_control").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    kills = int(value)
            failcnt = int((mem / "memory.failcnt").read_text())
        return OomReport(kills, failcnt)

    def sigkill(self) -> bool:
        """SIGKILL every process in the group, frozen so none can fork meanwhile, without
        waiting for their exit; False when the group is gone."""
        freezer = self.paths["freezer"]
        if not freezer.exists():
            return False
        state = freezer / "freezer.state"
        _write(state, "FROZEN")
        try:
            for pid in self.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        finally:
            _write(state, "THAWED")  # killed tasks only die once thawed
        return True

    def kill_all(self, timeout_s: float = 5.0) -> None:
        """SIGKILL every process in the group (:meth:`sigkill`) and wait until they are
        gone."""
        if not self.sigkill():
            return
        deadline = time.monotonic() + timeout_s
        while self.pids():
            if time.monotonic() > deadline:
                raise CgroupError(f"processes of cgroup {self.name!r} survive SIGKILL")
            time.sleep(0.002)

    def remove(self, timeout_s: float = 5.0) -> None:
        """Kill what is left and remove every group; retry while the kernel says busy."""
        if any(p.exists() for p in self.paths.values()):
            with contextlib.suppress(CgroupError):
                self.kill_all(timeout_s)
        deadline = time.monotonic() + timeout_s
        for path in self.paths.values():
            delay = 0.001
            while True:
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                        raise CgroupError(f"cannot remove {path}: {exc.strerror}") from exc
                    time.sleep(delay)
                    delay = min(delay * 2, 0.05)


def sweep_orphans(root: Path = CGROUP_ROOT) -> list[str]:
    """Remove groups left by an agent that died without closing its environments.

    Environment groups are named ``<task>-<agent pid>-<n>-<hex>``; a group whose agent pid
    is gone is killed and removed. Returns the names removed. Run at agent start.
    """
    removed: list[str] = []
    parent = root / "freezer" / PARENT
    if not parent.is_dir():
        return removed
    for entry in parent.iterdir():
        parts = entry.name.rsplit("-", 3)
        if not entry.is_dir() or len(parts) != 4 or not parts[1].isdigit():
            continue
        if Path(f"/proc/{parts[1]}").exists():
            continue
        CgroupSet(entry.name, root).remove()
        removed.append(entry.name)
    return removed

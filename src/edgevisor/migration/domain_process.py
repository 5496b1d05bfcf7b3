"""A domain's sandbox process: spawn, kill, reap, restart by policy, what it listens on.

:class:`DomainProcess` is the process layer of :class:`~edgevisor.migration.domain.Domain`
(a mixin: ``Domain`` owns the state it reads and the lifecycle lock it takes). The sandbox
is ``nsenter --net=<netns> bwrap ...`` (:func:`~edgevisor.migration.domain_parts.
domain_argv`) started from the event loop's thread (bwrap's parent-death signal follows
the thread that forked it); bwrap's namespace init blocks on a pipe until its pid sits in
the domain's cgroups, so everything the domain runs is limited. An exit while not
stopping goes to the restart policy (:func:`~edgevisor.migration.domain_parts.
restart_delay`) in ``_supervise``.

A staged domain (a migration's target, in prepare) gets a *launcher* ahead
(:meth:`DomainProcess._prespawn`): ``sh`` waiting for one line on its stdin, already moved
into the domain's cgroups, that then execs the same ``nsenter ... bwrap`` argv. The
sandbox it becomes inherits the cgroups, so the start at the switch skips the cgroup
attach: the first write to a cgroup v1 ``cgroup.procs`` waits for an RCU grace period
(``cgroup_threadgroup_rwsem``), 9-14 ms here, which was inside the downtime. The
launcher runs nothing of the domain before the line; killing the cgroups removes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

from edgevisor.errors import EdgevisorError
from edgevisor.migration.domain_host import DomainError
from edgevisor.migration.domain_parts import (
    DomainSpec,
    DomainsSettings,
    SavedState,
    StepClock,
    domain_argv,
    domain_env,
    restart_delay,
)
from edgevisor.network import netns as nn
from edgevisor.tasks.cgroups import CgroupError, CgroupLimits, CgroupSet
from edgevisor.tasks.sandbox_io import bwrap_child_pid, wait_readable

__all__ = ["DomainProcess"]

log = logging.getLogger("edgevisor.migration.domain")  # one logger for a domain's records

_LAUNCHER = 'read -r _ && exec "$@"'
"""The launcher's script: one line on stdin starts the sandbox; EOF (the agent died or
dropped it) ends it without starting anything."""


@dataclass
class _Launcher:
    """A sandbox started ahead, waiting in the domain's cgroups (see the module doc)."""

    proc: subprocess.Popen[bytes]
    block_w: int  # bwrap's --block-fd (its write end)
    info_r: int  # bwrap's --info-fd (its read end)

    def close(self) -> None:
        for fd in (self.block_w, self.info_r):
            with contextlib.suppress(OSError):
                os.close(fd)
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()


class DomainProcess:
    """The sandbox process of a domain (see the module docstring); mixed into ``Domain``."""

    # State owned by ``Domain`` (set in its ``__init__``).
    spec: DomainSpec
    settings: DomainsSettings
    address: IPv4Address
    netns: str
    dir: Path
    app_dir: Path
    mnt: Path
    log_path: Path
    uid: int
    gid: int
    phase: str
    last_exit: int | None
    started_at: float | None
    _cg: CgroupSet
    _proc: subprocess.Popen[bytes] | None
    _supervisor: asyncio.Task[None] | None
    _stopping: bool
    _failures: int
    _saved: SavedState
    _lock: asyncio.Lock
    _launcher: _Launcher | None

    @property
    def pid(self) -> int | None:
        """The host pid of bwrap (the domain's sandbox), while it runs."""
        return self._proc.pid if self._proc is not None else None

    def processes(self) -> list[int]:
        """Host pids of every process in the domain's cgroups (empty when none runs)."""
        return self._cg.pids()

    def _save(self) -> None:
        raise NotImplementedError  # Domain's

    async def _tear_down(self, clock: StepClock | None = None) -> None:
        raise NotImplementedError  # Domain's

    async def wait_listening(self, timeout_s: float, poll_s: float = 0.005) -> bool:
        """Wait until something in the domain listens on a TCP port (its service is up),
        at most ``timeout_s``; False when it does not (not running, or not a server).

        Reads the socket table of the domain's network namespace (through its sandbox's
        ``/proc/PID/net``): only the domain lives there, and nothing is sent to it."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout_s
        while True:
            pid = self.pid
            if pid is None or self.phase not in ("running", "starting"):
                return False
            if _listens(pid):
                return True
            if loop.time() >= end:
                return False
            await asyncio.sleep(poll_s)

    def _limits(self) -> CgroupLimits:
        return CgroupLimits(self.spec.memory_mb, self.spec.pids_max, self.spec.cpu)

    def _create_cgroups(self, limits: CgroupLimits) -> None:
        self._cg.remove(self.settings.stop_timeout_s)  # a leftover of ours, if any
        self._cg.create(limits)

    def _popen_sandbox(self, *, launcher: bool) -> tuple[subprocess.Popen[bytes], int, int]:
        """``nsenter ... bwrap ...`` started (from the loop's thread: the parent-death
        signal bwrap asks for follows the thread that forked it), or with ``launcher``
        the ``sh`` that execs it on a line on its stdin; returns the process, the write
        end of bwrap's block fd and the read end of its info fd."""
        s = self.settings
        block_r, block_w = os.pipe()
        info_r, info_w = os.pipe()
        argv = [
            "nsenter",
            f"--net={nn.NETNS_DIR}/{self.netns}",
            "--",
            *domain_argv(
                self.spec,
                app_dir=self.app_dir,
                empty_dir=self.dir / "empty",
                volume_dir=self.mnt,
                settings=s,
                uid=self.uid,
                gid=self.gid,
                block_fd=block_r,
                info_fd=info_w,
            ),
        ]
        if launcher:
            argv = ["/bin/sh", "-c", _LAUNCHER, "edgevisor-domain-launcher", *argv]
        env = domain_env(self.spec, s, str(self.address))
        with contextlib.suppress(FileNotFoundError):
            if self.log_path.stat().st_size > s.log_max_bytes:
                os.replace(self.log_path, self.log_path.with_suffix(".log.1"))
        try:
            with open(self.log_path, "ab") as logf:
                logf.write(f"--- start {time.strftime('%Y-%m-%dT%H:%M:%S')}\n".encode())
                logf.flush()
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.PIPE if launcher else subprocess.DEVNULL,
                    stdout=logf,
                    stderr=logf,
                    pass_fds=(block_r, info_w),
                    env=env,
                    close_fds=True,
                )
        except OSError as exc:
            for fd in (block_r, block_w, info_r, info_w):
                os.close(fd)
            raise DomainError(f"cannot start the domain sandbox: {exc}") from exc
        os.close(block_r)
        os.close(info_w)
        return proc, block_w, info_r

    async def _prespawn(self) -> None:
        """Start the launcher (see the module doc) and move it into the domain's
        cgroups, which must exist; idempotent. Called while staging, off the switch."""
        if self._launcher is not None and self._launcher.proc.poll() is None:
            return
        self._drop_launcher()
        proc, block_w, info_r = self._popen_sandbox(launcher=True)
        launcher = _Launcher(proc, block_w, info_r)
        try:
            await asyncio.to_thread(self._cg.add, proc.pid)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(proc.wait, 5)
            launcher.close()
            raise
        self._launcher = launcher

    def _drop_launcher(self) -> None:
        """Kill and forget a launcher that was not used (idempotent)."""
        launcher, self._launcher = self._launcher, None
        if launcher is None:
            return
        if launcher.proc.poll() is None:
            launcher.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                launcher.proc.wait(5)
        launcher.close()

    def _take_launcher(self) -> _Launcher | None:
        """The launcher, released (its sandbox starts), or None when there is none
        alive (the start then takes the ordinary path)."""
        launcher, self._launcher = self._launcher, None
        if launcher is None:
            return None
        stdin = launcher.proc.stdin
        try:
            if launcher.proc.poll() is not None or stdin is None:
                raise OSError("the launcher exited")
            stdin.write(b"go\n")
            stdin.close()  # the domain's stdin reads EOF, as from /dev/null
        except OSError as exc:
            log.info("domain %s: launcher unusable (%s); starting afresh", self.spec.name, exc)
            self._launcher = launcher
            self._drop_launcher()
            return None
        return launcher

    async def _spawn(self, clock: StepClock | None = None) -> None:
        """Start the sandbox in the namespace and cgroups: the launcher's if one waits
        (already in the cgroups), else a new one moved there before it runs anything."""
        s = self.settings
        launcher = self._take_launcher()
        if launcher is not None:
            self._proc, block_w, info_r = launcher.proc, launcher.block_w, launcher.info_r
        else:
            self._proc, block_w, info_r = self._popen_sandbox(launcher=False)
        child: int | None = None
        try:
            child = await asyncio.wait_for(bwrap_child_pid(info_r), s.start_timeout_s)
            if child is None:
                raise DomainError(
                    f"domain {self.spec.name!r}: sandbox did not start: {self._log_tail()}"
                )
            if clock is not None:
                clock.mark("sandbox")  # nsenter + bwrap up, the child waits for the cgroups
            try:
                if launcher is None:  # a launcher's sandbox inherited them
                    self._cg.add(child)
            except CgroupError:
                # Empty groups may be cleared by others (a staged one waits empty until
                # the start); the sandbox still waits for us, so build them again once.
                log.info("domain %s: cgroups vanished; creating them again", self.spec.name)
                await asyncio.to_thread(self._create_cgroups, self._limits())
                self._cg.add(child)
            os.write(block_w, b"1")
        except BaseException:
            # The sandbox's init waits on the block fd, and runs the command when it is
            # closed, not only when it reads "1": kill it before that fd closes, as it is
            # in no cgroup of ours yet (regression: a failed start left the command running).
            if child is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)
            with contextlib.suppress(Exception):
                await self._kill()
            raise
        finally:
            os.close(info_r)
            os.close(block_w)
        self.started_at = time.time()

    async def _kill(self) -> None:
        with contextlib.suppress(EdgevisorError):
            await asyncio.to_thread(self._cg.kill_all, self.settings.stop_timeout_s)
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            await asyncio.to_thread(proc.wait, self.settings.stop_timeout_s)

    def _reap(self) -> None:
        self._drop_launcher()
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._proc.wait(5)
            self._proc = None

    async def _wait_exit(self) -> int:
        proc = self._proc
        assert proc is not None
        fd = os.pidfd_open(proc.pid)
        try:
            while proc.poll() is None:
                await wait_readable(fd)
        finally:
            os.close(fd)
        return int(proc.returncode)

    async def _supervise(self) -> None:
        """Wait for exits; restart by policy with backoff, or tear down."""
        s = self.settings
        while True:
            status = await self._wait_exit()
            if self._stopping:
                return
            async with self._lock:
                if self._stopping:
                    return
                self.last_exit = status
                with contextlib.suppress(EdgevisorError):
                    await asyncio.to_thread(self._cg.kill_all, s.stop_timeout_s)
                self._reap()
                ran_s = time.time() - (self.started_at or time.time())
                if ran_s >= s.backoff_reset_s:
                    self._failures = 0
                delay = restart_delay(self.spec.restart, status, self._failures, s)
                log.info(
                    "domain %s exited with status %s after %.1f s; restart in %s s",
                    self.spec.qualified, status, ran_s, delay,
                )  # fmt: skip
                if delay is None:  # the phase changes once everything is down
                    self._saved.desired = "stopped"
                    self._save()
                    self._supervisor = None
                    with contextlib.suppress(EdgevisorError):
                        await self._tear_down()
                    self.phase = "exited" if status == 0 else "failed"
                    return
                self.phase = "backoff"
            await asyncio.sleep(delay)
            async with self._lock:
                if self._stopping:
                    return
                self._failures += 1
                self._saved.restarts += 1
                self._save()
                try:
                    await self._spawn()
                except EdgevisorError as exc:
                    log.warning("domain %s: restart failed: %s", self.spec.qualified, exc)
                    self._supervisor = None
                    with contextlib.suppress(EdgevisorError):
                        await self._tear_down()
                    self.phase = "failed"
                    return
                self.phase = "running"

    def _log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode(errors="replace").strip()
        except OSError:
            return ""


_TCP_LISTEN = "0A"  # the state column of /proc/net/tcp{,6}


def _listens(pid: int) -> bool:
    """A TCP socket in LISTEN state in the network namespace of process ``pid``."""
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as f:
                next(f, None)  # header
                for line in f:
                    fields = line.split(None, 4)
                    if len(fields) > 3 and fields[3] == _TCP_LISTEN:
                        return True
        except OSError:
            continue
    return False

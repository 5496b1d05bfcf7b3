"""The domain runtime: one long-lived isolated environment with a volume, on one host.

Theory of operation (one :class:`Domain`)::

    stopped --start()--> starting --spawned--> running <--freeze()/thaw()--> frozen
       ^                                          |  exit
       |                           restart policy |---- delay ----> backoff --> (respawn)
       |                                          +---- no restart --> exited | failed
       +-------- stop() / quiesce() from any phase (everything torn down) ------+

``start`` builds the layers bottom-up and ``stop`` tears them down top-down:

1. volume: created on first start (through the ``volumes`` backend), attached on the host
   at ``<domain dir>/mnt`` (FUSE image -> loop -> ext4), its root chowned to the domain uid;
2. network: a namespace behind a veth (:func:`create_domain_netns`, the one place that
   builds it), holding a test address reachable from the host;
3. cgroups (memory, pids, cpu, freezer) under ``edgevisor-domains/<host tag>/``;
4. the process: ``nsenter --net=<netns> bwrap ...`` (pid, mount, ipc, uts namespaces,
   the volume bound at ``/data``, uid 65534, no capabilities). bwrap's namespace init
   blocks until it sits in the cgroups, so everything the domain runs is limited.

An exit while not stopping goes to the restart policy (:func:`restart_delay`); the
volume, network and cgroups stay up across restarts. A domain that is not restarted is
torn down like a stop. ``quiesce`` (the migration's QuiesceSource) is freeze -> syncfs on
the volume -> stop, so nothing the domain wrote after the freeze can exist, and every
write it completed is on the volume when ``quiesce`` returns.

bwrap runs with ``--die-with-parent`` from the event loop's thread, so domains die with
the agent: :func:`clear_stale` (agent start) finds what a previous run left (namespaces by
name prefix, cgroups under the host's parent, attached volumes named in state files) and
clears it before domains are started again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import subprocess
import time
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from edgevisor.errors import Conflict, EdgevisorError, NotFound
from edgevisor.migration.domain_host import (
    DomainError,
    LocalVolumes,
    VolumeBackend,
    clear_stale,
    create_domain_netns,
    domain_cgroup,
    remove_domain_netns,
    set_freezer,
    syncfs,
)
from edgevisor.migration.domain_parts import (
    DomainSpec,
    DomainsSettings,
    domain_argv,
    domain_env,
    domain_tag,
    netns_name,
    restart_delay,
)
from edgevisor.network import netns as nn
from edgevisor.tasks.cgroups import CgroupLimits

__all__ = [
    "Domain",
    "DomainError",
    "LocalVolumes",
    "VolumeBackend",
    "clear_stale",
    "create_domain_netns",
]

log = logging.getLogger(__name__)


# -- state on disk ----------------------------------------------------------------------------


@dataclass
class _Saved:
    """``state.json``: what a later agent run needs to find and clear this domain's objects."""

    slot: int
    desired: str = "stopped"  # running | stopped
    restarts: int = 0

    @classmethod
    def load(cls, path: Path) -> _Saved | None:
        try:
            raw = json.loads(path.read_text())
            return cls(int(raw["slot"]), str(raw.get("desired", "stopped")), int(raw["restarts"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.__dict__))
        os.replace(tmp, path)


# -- the domain -------------------------------------------------------------------------------


class Domain:
    """One domain on this host (see the module docstring).

    ``host`` only names kernel objects: it must be unique to this agent on the machine.
    """

    def __init__(
        self,
        spec: DomainSpec,
        *,
        host: str,
        dir: Path,
        slot: int,
        address: IPv4Address,
        volumes: VolumeBackend,
        settings: DomainsSettings,
        uid: int = 65534,
        gid: int = 65534,
    ) -> None:
        self.spec = spec
        self.host = host
        self.dir = dir
        self.address = address
        self.volumes = volumes
        self.settings = settings
        self.uid, self.gid = uid, gid
        self.tag = domain_tag(host, spec.qualified)
        self.netns = netns_name(host, spec.qualified)
        self.mnt = dir / "mnt"
        self.app_dir = dir / "app"
        self.log_path = dir / "domain.log"
        self._state_path = dir / "state.json"
        saved = _Saved.load(self._state_path)
        self._saved = saved or _Saved(slot)
        self._saved.slot = slot
        self._cg = domain_cgroup(host, self.tag)
        self.phase = "stopped"
        self.ifname: str | None = None
        self.last_exit: int | None = None
        self.started_at: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._stopping = False
        self._failures = 0
        self._lock = asyncio.Lock()

    @property
    def restarts(self) -> int:
        return self._saved.restarts

    @property
    def desired(self) -> str:
        return self._saved.desired

    @property
    def pid(self) -> int | None:
        """The host pid of bwrap (the domain's sandbox), while it runs."""
        return self._proc.pid if self._proc is not None else None

    def _save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._saved.save(self._state_path)

    def status(self) -> dict[str, Any]:
        return {
            "account": self.spec.account,
            "name": self.spec.name,
            "phase": self.phase,
            "desired": self._saved.desired,
            "restarts": self._saved.restarts,
            "last_exit": self.last_exit,
            "pid": self.pid,
            "address": str(self.address),
            "netns": self.netns,
            "volume": self.spec.volume,
            "volume_id": self.spec.volume_id,
            "restart": self.spec.restart,
            "command": list(self.spec.command),
            "started_at": self.started_at,
            "log": str(self.log_path),
        }

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Bring the domain up (idempotent while it runs; refused while frozen)."""
        async with self._lock:
            if self.phase in ("running", "starting", "backoff"):
                return
            if self.phase == "frozen":
                raise Conflict(f"domain {self.spec.name!r} is frozen; thaw it first")
            self.phase = "starting"
            self._stopping = False
            self._failures = 0
            self._saved.desired = "running"
            self._save()
            try:
                await self._bring_up()
                await self._spawn()
            except BaseException:
                await self._tear_down()
                self.phase = "failed"
                raise
            self.phase = "running"
            self._supervisor = asyncio.get_running_loop().create_task(self._supervise())

    async def stop(self, *, keep_desired: bool = False) -> None:
        """Stop every process and tear down volume, network and cgroups (idempotent).

        ``keep_desired`` (agent shutdown) leaves the domain marked to run at the next start.
        """
        async with self._lock:
            if not keep_desired:
                self._saved.desired = "stopped"
                self._save()
            await self._stop_locked()

    async def freeze(self) -> None:
        async with self._lock:
            if self.phase != "running":
                raise Conflict(f"domain {self.spec.name!r} is {self.phase}, not running")
            await set_freezer(self._cg, "FROZEN", self.settings.stop_timeout_s)
            self.phase = "frozen"

    async def thaw(self) -> None:
        async with self._lock:
            if self.phase != "frozen":
                raise Conflict(f"domain {self.spec.name!r} is {self.phase}, not frozen")
            await set_freezer(self._cg, "THAWED", self.settings.stop_timeout_s)
            self.phase = "running"

    async def quiesce(self) -> None:
        """Freeze, flush the volume, stop: every completed write is on the volume after."""
        async with self._lock:
            self._saved.desired = "stopped"
            self._save()
            if self.phase == "running":
                await set_freezer(self._cg, "FROZEN", self.settings.stop_timeout_s)
                self.phase = "frozen"
            if self.phase == "frozen":
                await asyncio.to_thread(syncfs, self.mnt)
            await self._stop_locked()

    async def _stop_locked(self) -> None:
        self._stopping = True
        if self.phase == "stopped":
            await self._tear_down()  # leftovers of a failed start are cleared too
            return
        self.phase = "stopping"
        await self._kill()
        sup, self._supervisor = self._supervisor, None
        if sup is not None and sup is not asyncio.current_task():
            sup.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await sup
        await self._tear_down()
        self.phase = "stopped"

    # -- the layers ---------------------------------------------------------------------

    async def _bring_up(self) -> None:
        s = self.settings
        self.dir.mkdir(parents=True, exist_ok=True)
        self.app_dir.mkdir(exist_ok=True)
        self.app_dir.chmod(0o755)
        (self.dir / "empty").mkdir(exist_ok=True)
        try:
            self.volumes.info(self.spec.volume_id)
        except NotFound:
            await self.volumes.create(
                self.spec.volume, self.spec.volume_size_bytes, account=self.spec.account
            )
        self.mnt.mkdir(exist_ok=True)
        await self.volumes.attach(self.spec.volume_id, self.mnt)
        await asyncio.to_thread(os.chown, self.mnt, self.uid, self.gid)
        self.ifname = await asyncio.to_thread(
            create_domain_netns, self.netns, self.spec.account, self.address
        )
        self._cg.remove(s.stop_timeout_s)  # a leftover of ours, if any
        limits = CgroupLimits(self.spec.memory_mb, self.spec.pids_max, self.spec.cpu)
        await asyncio.to_thread(self._cg.create, limits)

    async def _tear_down(self) -> None:
        errors: list[str] = []
        s = self.settings
        try:
            await asyncio.to_thread(self._cg.remove, s.stop_timeout_s)
        except EdgevisorError as exc:
            errors.append(exc.message)
        self._reap()
        try:
            await asyncio.to_thread(
                remove_domain_netns, self.netns, nn.instance_ifname(self.spec.account, self.address)
            )
        except EdgevisorError as exc:
            errors.append(exc.message)
        self.ifname = None
        try:
            await self.volumes.detach(self.spec.volume_id)
        except NotFound:
            pass
        except EdgevisorError as exc:
            errors.append(exc.message)
        self.started_at = None
        if errors:
            raise DomainError(f"domain {self.spec.name!r}: cleanup failed: {'; '.join(errors)}")

    async def _spawn(self) -> None:
        """Start the sandbox in the namespace and cgroups (from the loop's thread: the
        parent-death signal bwrap asks for follows the thread that forked it)."""
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
        env = domain_env(self.spec, s, str(self.address))
        with contextlib.suppress(FileNotFoundError):
            if self.log_path.stat().st_size > s.log_max_bytes:
                os.replace(self.log_path, self.log_path.with_suffix(".log.1"))
        try:
            with open(self.log_path, "ab") as logf:
                logf.write(f"--- start {time.strftime('%Y-%m-%dT%H:%M:%S')}\n".encode())
                logf.flush()
                self._proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
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
        try:
            os.set_blocking(info_r, False)
            info = await asyncio.wait_for(_read_all(info_r), s.start_timeout_s)
            child = _child_pid(info)
            if child is None:
                raise DomainError(
                    f"domain {self.spec.name!r}: sandbox did not start: {self._log_tail()}"
                )
            self._cg.add(child)
            os.write(block_w, b"1")
        except BaseException:
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
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._proc.wait(5)
            self._proc = None

    async def _wait_exit(self) -> int:
        proc = self._proc
        assert proc is not None
        loop = asyncio.get_running_loop()
        fd = os.pidfd_open(proc.pid)
        try:
            while proc.poll() is None:
                fut: asyncio.Future[None] = loop.create_future()
                loop.add_reader(fd, _wake, fut)
                try:
                    await fut
                finally:
                    loop.remove_reader(fd)
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


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def _read_all(fd: int) -> bytes:
    loop = asyncio.get_running_loop()
    data = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            fut: asyncio.Future[None] = loop.create_future()
            loop.add_reader(fd, _wake, fut)
            try:
                await fut
            finally:
                loop.remove_reader(fd)
            continue
        if not chunk:
            return data
        data += chunk


def _child_pid(info: bytes) -> int | None:
    try:
        pid = json.loads(info).get("child-pid")
    except (ValueError, AttributeError):
        return None
    return pid if isinstance(pid, int) and pid > 0 else None

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
   builds it), holding a test address reachable from the host, or the domain's logical
   address, which the address dataplane routes in the account's table (``plug``);
3. cgroups (memory, pids, cpu, freezer) under ``edgevisor-domains/<host tag>/``;
4. the process: ``nsenter --net=<netns> bwrap ...`` (pid, mount, ipc, uts namespaces,
   the volume bound at ``/data``, uid 65534, no capabilities). bwrap's namespace init
   blocks until it sits in the cgroups, so everything the domain runs is limited.

Layers 1-3 are independent, so ``start`` builds them concurrently (the volume's attach
is the long one); ``stage`` builds the cgroups and the namespace ahead (a migration's
target, in prepare), the veth under a staged name that the start renames to its own (the
source may hold that name until it quiesces: simulated hosts share one root namespace).

An exit while not stopping goes to the restart policy (:func:`restart_delay`); the
volume, network and cgroups stay up across restarts. A domain that is not restarted is
torn down like a stop. ``quiesce`` (the migration's QuiesceSource, on the switch's
critical path) is freeze -> syncfs -> SIGKILL -> cgroups removed, ext4 unmounted, veth
deleted (the last two concurrently): nothing the domain wrote after the freeze can exist,
every write it completed is on the volume, and nothing on this host writes the volume any
more when it returns. The namespace, loop device and FUSE process go in the background;
every later lifecycle call (and :meth:`Domain.wait_torn_down`) waits for that first. Each
operation's sub-step durations are kept in ``Domain.timings`` (benchmarks report them).

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
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from edgevisor.errors import Conflict, EdgevisorError, NotFound
from edgevisor.migration.domain_host import (
    DomainError,
    LocalVolumes,
    VolumeBackend,
    activate_domain_netns,
    clear_stale,
    create_domain_netns,
    domain_cgroup,
    remove_domain_netns,
    set_freezer,
    stage_domain_netns,
    syncfs,
    unmount,
)
from edgevisor.migration.domain_parts import (
    DomainSpec,
    DomainsSettings,
    StepClock,
    domain_argv,
    domain_env,
    domain_tag,
    netns_name,
    restart_delay,
)
from edgevisor.network import netns as nn
from edgevisor.tasks.cgroups import CgroupError, CgroupLimits

__all__ = [
    "Domain",
    "DomainError",
    "LocalVolumes",
    "VolumeBackend",
    "clear_stale",
    "create_domain_netns",
]

log = logging.getLogger(__name__)

Plug = Callable[[str, IPv4Address], Awaitable[None]]
"""Routes a domain's logical address to its veth: ``plug(account, address)``."""


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
        plug: Plug | None = None,
    ) -> None:
        self.spec = spec
        # With ``plug``, ``address`` is the domain's logical address: the address
        # dataplane routes it (``plug`` once the veth exists), not the host's main table.
        self.plug = plug
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
        """The host side of the veth while it carries the domain's own name (we hold it)."""
        self._staged_ifname = "evs" + self.tag  # its name while staged (<= 15 characters)
        self._net_staged = False  # the namespace exists under ``_staged_ifname``
        self.last_exit: int | None = None
        self.started_at: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._stopping = False
        self._failures = 0
        self._lock = asyncio.Lock()
        self._staged = False  # network and cgroups are up while stopped (see ``stage``)
        self._teardown: asyncio.Task[None] | None = None  # quiesce's deferred part
        self._hurry = asyncio.Event()  # someone waits for that part: no more delay
        self.timings: dict[str, dict[str, float]] = {}
        """Seconds per sub-step of the last ``start``/``quiesce``/``stage`` (benchmarks)."""

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
            await self._settle()
            self.phase = "starting"
            self._stopping = False
            self._failures = 0
            self._saved.desired = "running"
            self._save()
            clock = StepClock()
            try:
                await self._bring_up(clock)
                await self._spawn(clock)
            except BaseException:
                await self._tear_down()
                self.phase = "failed"
                raise
            self.phase = "running"
            self._supervisor = asyncio.get_running_loop().create_task(self._supervise())
            self.timings["start"] = clock.done()

    async def stage(self) -> None:
        """Build what a start needs that touches neither the volume's data nor the
        address's routing (directories, cgroups, the network namespace with its veth
        under a staged name) while the domain is stopped: a migration's target does this
        in *prepare*, before the source stops, so the switch only renames the veth and
        routes to it. Idempotent; ``stop`` removes it again.
        """
        async with self._lock:
            await self._settle()
            if self.phase != "stopped" or self._staged:
                return
            clock = StepClock()
            try:
                self._make_dirs()
                t0 = clock.now()

                async def network() -> None:
                    await asyncio.to_thread(
                        stage_domain_netns, self.netns, self.spec.account, self.address,
                        self._staged_ifname,
                    )  # fmt: skip
                    self._net_staged = True
                    clock.since(t0, "netns")

                results = await asyncio.gather(
                    self._bring_up_cgroups(clock), network(), return_exceptions=True
                )
                clock.skip()
                for r in results:
                    if isinstance(r, BaseException):
                        raise r
            except BaseException:
                await self._tear_down()
                raise
            self._staged = True
            self.timings["stage"] = clock.done()

    async def stop(self, *, keep_desired: bool = False) -> None:
        """Stop every process and tear down volume, network and cgroups (idempotent).

        ``keep_desired`` (agent shutdown) leaves the domain marked to run at the next start.
        """
        async with self._lock:
            if not keep_desired:
                self._saved.desired = "stopped"
                self._save()
            await self._settle()
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
        """Freeze, flush, kill, unmount: when it returns, every write the domain completed
        is on the volume and nothing on this host writes to the volume any more.

        This is the source's share of a migration's downtime, so only that is waited for:
        the processes get SIGKILL while frozen (their writes are flushed and they are
        discarded anyway), cgroups and the veth (its name, and the
        address's route) go at once, the filesystem is unmounted with umount(2); the
        namespace, the volume's loop device and FUSE process go in the background, and
        every later lifecycle call, and :meth:`wait_torn_down`, waits for that. If a
        step fails, everything is torn down the ordinary way before the error is raised.
        """
        async with self._lock:
            clock = StepClock()
            self._saved.desired = "stopped"
            self._save()
            clock.mark("save_state")
            if self.phase == "running":
                await set_freezer(self._cg, "FROZEN", self.settings.stop_timeout_s)
                self.phase = "frozen"
                clock.mark("freeze")
            if self.phase != "frozen":  # not running: the plain stop (idempotent)
                await self._settle()
                await self._stop_locked(clock)
                self.timings["quiesce"] = clock.done()
                return
            await asyncio.to_thread(syncfs, self.mnt)
            clock.mark("syncfs")
            self._stopping = True
            self.phase = "stopping"
            await self._kill()
            sup, self._supervisor = self._supervisor, None
            if sup is not None and sup is not asyncio.current_task():
                sup.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await sup
            self._reap()  # killed and waited for: only forgets it
            clock.mark("kill")
            # cgroup.procs hides a process once its exit began, but it holds its mount
            # namespace (a reference to the filesystem) a little longer; removing the
            # groups succeeds only when every task has fully exited. After that, our
            # unmount is the filesystem's last reference: it writes the superblock now,
            # before the target mounts its copy (which reads ours), not at some later
            # moment when the sandbox's namespace goes.
            t0 = clock.now()

            async def filesystem() -> None:
                await asyncio.to_thread(self._cg.remove, self.settings.stop_timeout_s)
                clock.since(t0, "cgroups")
                await asyncio.to_thread(unmount, self.mnt)
                clock.since(t0, "unmount")

            async def network() -> None:
                # The veth now, not later: the target gives its veth the same name (it
                # derives from the address, which moves with the domain) when it starts.
                # The namespace itself (another ~10 ms) goes with the deferred teardown.
                if self.ifname is not None:
                    await asyncio.to_thread(nn.ip, "link", "del", self.ifname, check=False)
                self.ifname = None
                clock.since(t0, "netns")

            results = await asyncio.gather(filesystem(), network(), return_exceptions=True)
            clock.skip()
            for r in results:
                if isinstance(r, BaseException):
                    with contextlib.suppress(EdgevisorError):
                        await self._tear_down()
                    self.phase = "stopped"
                    raise r
            self.phase = "stopped"
            self._hurry.clear()
            self._teardown = asyncio.get_running_loop().create_task(self._tear_down_later())
            self.timings["quiesce"] = clock.done()

    async def wait_torn_down(self) -> None:
        """Wait until a quiesce's background teardown ended (at once if none runs)."""
        async with self._lock:
            await self._settle()

    async def _settle(self) -> None:
        task, self._teardown = self._teardown, None
        if task is not None:
            self._hurry.set()
            with contextlib.suppress(Exception):  # logged by the task; the next stop retries
                await task

    async def _tear_down_later(self) -> None:
        clock = StepClock()
        try:
            delay = self.settings.quiesce_cleanup_delay_s
            if delay:  # cut short by whoever waits for the teardown (``_settle``)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._hurry.wait(), delay)
            await self._tear_down(clock)
        except EdgevisorError as exc:
            log.warning("domain %s: teardown after quiesce: %s", self.spec.qualified, exc)
        finally:
            self.timings["teardown"] = clock.done()

    async def _stop_locked(self, clock: StepClock | None = None) -> None:
        clock = clock or StepClock()
        self._stopping = True
        if self.phase == "stopped":
            await self._tear_down(clock)  # leftovers of a failed start are cleared too
            return
        self.phase = "stopping"
        await self._kill()
        clock.mark("kill")
        sup, self._supervisor = self._supervisor, None
        if sup is not None and sup is not asyncio.current_task():
            sup.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await sup
        await self._tear_down(clock)
        self.phase = "stopped"

    # -- the layers ---------------------------------------------------------------------

    def _make_dirs(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.app_dir.mkdir(exist_ok=True)
        self.app_dir.chmod(0o755)
        (self.dir / "empty").mkdir(exist_ok=True)
        self.mnt.mkdir(exist_ok=True)

    async def _bring_up(self, clock: StepClock) -> None:
        """The volume, and (unless staged) network and cgroups, concurrently: they are
        independent, and each is mostly waiting for a tool or the kernel."""
        self._make_dirs()
        clock.mark("dirs")
        t0 = clock.now()

        layers = [self._bring_up_volume(clock, t0), self._bring_up_network(clock)]
        if not self._staged:
            layers.append(self._bring_up_cgroups(clock))
        results = await asyncio.gather(*layers, return_exceptions=True)
        clock.skip()
        for r in results:  # the caller tears down whatever did come up
            if isinstance(r, BaseException):
                raise r

    async def _bring_up_volume(self, clock: StepClock, t0: float) -> None:
        try:
            self.volumes.info(self.spec.volume_id)
        except NotFound:
            await self.volumes.create(
                self.spec.volume, self.spec.volume_size_bytes, account=self.spec.account
            )
        await self.volumes.attach(self.spec.volume_id, self.mnt)
        await asyncio.to_thread(os.chown, self.mnt, self.uid, self.gid)
        clock.since(t0, "volume")

    async def _bring_up_network(self, clock: StepClock) -> None:
        """The namespace behind its veth, then the route of the address to it: the host
        route of a test address, or the address dataplane's route of a logical one
        (``plug``).

        Staged (:meth:`stage`), the namespace exists already and its veth only gets its
        own name here: the name derives from (account, address), and a migrating domain
        keeps its address, so on one machine (simulated hosts share the root namespace)
        the target's veth would otherwise replace the running source's.
        """
        t0 = clock.now()
        test_route = self.plug is None
        if self._net_staged:
            self.ifname = await asyncio.to_thread(
                activate_domain_netns, self._staged_ifname, self.spec.account, self.address,
                host_route=test_route,
            )  # fmt: skip
            self._net_staged = False
        else:
            self.ifname = await asyncio.to_thread(
                create_domain_netns, self.netns, self.spec.account, self.address,
                host_route=test_route,
            )  # fmt: skip
        if self.plug is not None:
            await self.plug(self.spec.account, self.address)
        clock.since(t0, "netns")

    async def _bring_up_cgroups(self, clock: StepClock) -> None:
        t0 = clock.now()
        await asyncio.to_thread(self._create_cgroups, self._limits())
        clock.since(t0, "cgroups")

    def _limits(self) -> CgroupLimits:
        return CgroupLimits(self.spec.memory_mb, self.spec.pids_max, self.spec.cpu)

    def _create_cgroups(self, limits: CgroupLimits) -> None:
        self._cg.remove(self.settings.stop_timeout_s)  # a leftover of ours, if any
        self._cg.create(limits)

    async def _tear_down(self, clock: StepClock | None = None) -> None:
        """Remove cgroups (killing what is left), network and volume attachment. The
        three are independent once no process of the domain runs, so they go at once."""
        clock = clock or StepClock()
        errors: list[str] = []
        s = self.settings
        t0 = clock.now()

        async def cgroups() -> None:
            try:
                await asyncio.to_thread(self._cg.remove, s.stop_timeout_s)
            except EdgevisorError as exc:
                errors.append(exc.message)
            self._reap()
            clock.since(t0, "cgroups")

        async def network() -> None:
            # Only a veth we hold is deleted by name: after a quiesce (veth gone) or
            # while staged, the domain's own name may belong to the domain's other copy
            # on this machine (simulated hosts). Deleting the namespace takes the pair.
            ifname = self.ifname or (self._staged_ifname if self._net_staged else None)
            try:
                await asyncio.to_thread(remove_domain_netns, self.netns, ifname)
            except EdgevisorError as exc:
                errors.append(exc.message)
            self.ifname = None
            self._net_staged = False
            clock.since(t0, "netns")

        async def volume() -> None:
            try:
                await self.volumes.detach(self.spec.volume_id)
            except NotFound:
                pass
            except EdgevisorError as exc:
                errors.append(exc.message)
            clock.since(t0, "volume")

        results = await asyncio.gather(cgroups(), network(), volume(), return_exceptions=True)
        clock.skip()
        self._staged = False
        for r in results:
            if isinstance(r, BaseException):
                raise r
        self.started_at = None
        if errors:
            raise DomainError(f"domain {self.spec.name!r}: cleanup failed: {'; '.join(errors)}")

    async def _spawn(self, clock: StepClock | None = None) -> None:
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
        child: int | None = None
        try:
            os.set_blocking(info_r, False)
            info = await asyncio.wait_for(_read_all(info_r), s.start_timeout_s)
            child = _child_pid(info)
            if child is None:
                raise DomainError(
                    f"domain {self.spec.name!r}: sandbox did not start: {self._log_tail()}"
                )
            if clock is not None:
                clock.mark("sandbox")  # nsenter + bwrap up, the child waits for the cgroups
            try:
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

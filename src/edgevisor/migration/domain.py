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
   blocks until it sits in the cgroups, so everything the domain runs is limited
   (:mod:`~edgevisor.migration.domain_process`: spawn, kill, supervise).

Layers 1-3 are independent, so ``start`` builds them concurrently (the volume's attach
is the long one); ``stage`` builds the cgroups and the namespace ahead (a migration's
target, in prepare), the veth under a staged name that the start renames to its own (the
source may hold that name until it quiesces: simulated hosts share one root namespace),
and a launcher of the sandbox already in the cgroups (:mod:`~edgevisor.migration.
domain_process`): the start then skips the cgroup attach and its RCU grace period.

An exit while not stopping goes to the restart policy (:func:`restart_delay`); the
volume, network and cgroups stay up across restarts. A domain that is not restarted is
torn down like a stop. ``quiesce`` (the migration's QuiesceSource, on the switch's
critical path) is syncfs while running (not downtime; skipped right after a
``preflush``) -> freeze -> syncfs -> SIGKILL -> ext4 made read-only (as soon as no file
is open for writing) while the tasks exit, the cgroups are removed, the veth retired: nothing
the domain wrote after the freeze can exist, every write it completed is on the volume,
and nothing on this host writes the volume any more when it returns. The namespace,
the unmount, loop device and FUSE process go in the background; every later lifecycle
call (and :meth:`Domain.wait_torn_down`) waits for that first. A failed quiesce leaves
the domain running (the freeze failed) or stopped and torn down, never frozen. Each operation's
sub-step durations are kept in ``Domain.timings`` (benchmarks report them).

bwrap runs with ``--die-with-parent`` from the event loop's thread, so domains die with
the agent: :func:`clear_stale` (agent start) finds what a previous run left (namespaces by
name prefix, cgroups under the host's parent, attached volumes named in state files) and
clears it before domains are started again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
from collections.abc import Awaitable, Callable
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
    stage_domain_netns,
    unmount,
)
from edgevisor.migration.domain_parts import (
    DomainSpec,
    DomainsSettings,
    SavedState,
    StepClock,
    domain_tag,
    netns_name,
)
from edgevisor.migration.domain_quiesce import DomainQuiesce

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


# -- the domain -------------------------------------------------------------------------------


class Domain(DomainQuiesce):
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
        saved = SavedState.load(self._state_path)
        self._saved = saved or SavedState(slot)
        self._saved.slot = slot
        self._cg = domain_cgroup(host, self.tag)
        self.phase = "stopped"
        self.ifname: str | None = None
        """The host side of the veth while it carries the domain's own name (we hold it)."""
        self._staged_ifname = "evs" + self.tag  # its name while staged (<= 15 characters)
        self._retired = "evq" + self.tag  # its name after a quiesce, until the teardown
        self._net_staged = False  # the namespace exists under ``_staged_ifname``
        self.last_exit: int | None = None
        self.started_at: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._launcher = None  # the sandbox started ahead while staged (``_prespawn``)
        self._supervisor: asyncio.Task[None] | None = None
        self._stopping = False
        self._failures = 0
        self._lock = asyncio.Lock()
        self._staged = False  # network and cgroups are up while stopped (see ``stage``)
        self._teardown: asyncio.Task[None] | None = None  # quiesce's deferred part
        self._hurry = asyncio.Event()  # someone waits for that part: no more delay
        self._preflushed_at: float | None = None  # monotonic end of the last preflush()
        self.timings: dict[str, dict[str, float]] = {}
        """Seconds per sub-step of the last ``start``/``quiesce``/``stage`` (benchmarks)."""

    @property
    def restarts(self) -> int:
        return self._saved.restarts

    @property
    def desired(self) -> str:
        return self._saved.desired

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
                # the sandbox waiting in the cgroups: the start skips their attach
                await self._prespawn()
                clock.mark("launcher")
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

    async def wait_torn_down(self, *, hurry: bool = True) -> None:
        """Wait until a quiesce's background teardown ended (at once if none runs).

        ``hurry=False`` lets it keep its ``quiesce_cleanup_delay_s`` (a migration's
        demotion of the source, which needs the volume detached but is not urgent): the
        wait then holds no lock, so a lifecycle call meanwhile still cuts it short.
        """
        task = self._teardown
        if not hurry and task is not None:
            with contextlib.suppress(Exception):  # logged by the task; _settle retries
                await asyncio.shield(task)
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
        # The mount has the root inode in memory (no I/O), and a migrated volume's root
        # is the domain's already: no thread hop on the switch's path for a no-op chown.
        st = os.stat(self.mnt)
        if (st.st_uid, st.st_gid) != (self.uid, self.gid):
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
                # the filesystem first (a quiesce left it mounted read-only), then the rest
                # of the attachment
                await asyncio.to_thread(unmount, self.mnt, busy_timeout_s=s.stop_timeout_s)
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

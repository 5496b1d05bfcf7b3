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
    checkpoint_journal,
    clear_stale,
    create_domain_netns,
    domain_cgroup,
    remove_domain_netns,
    retire_link,
    seal_readonly,
    set_freezer,
    sigkill_all,
    stage_domain_netns,
    syncfs,
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
from edgevisor.migration.domain_process import DomainProcess

__all__ = [
    "Domain",
    "DomainError",
    "LocalVolumes",
    "VolumeBackend",
    "clear_stale",
    "create_domain_netns",
]

log = logging.getLogger(__name__)

_PREFLUSH_AGAIN_S = 0.05
"""A flush before the freeze that took longer is run once more (the domain kept writing)."""
_SEAL_POLL_S = 0.0003
"""First retry of the read-only remount while the killed tasks still hold files open for
writing (it starts with the kill; their exit takes a few ms)."""
_PREFLUSH_FRESH_S = 0.25
"""A quiesce this soon after a :meth:`Domain.preflush` (a migration flushes right before
the switch) skips its own flush before the freeze: it would find next to nothing to
write yet costs a syncfs, a flush of the volume and a journal checkpoint (1.5-8 ms
measured) inside the downtime; the flush after the freeze still carries every write."""

Plug = Callable[[str, IPv4Address], Awaitable[None]]
"""Routes a domain's logical address to its veth: ``plug(account, address)``."""


# -- the domain -------------------------------------------------------------------------------


class Domain(DomainProcess):
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
        """Flush, freeze, flush, kill, seal: when it returns, every write the domain
        completed is on the volume and nothing on this host writes to the volume any more.

        This is the source's share of a migration's downtime, so only that is waited for.
        The first flush runs while the domain still serves (:meth:`_preflush`, with the
        journal's checkpoint): what the domain wrote until then reaches the volume outside
        the downtime, and the flush after the freeze and the seal carry only the rest.
        Right after a :meth:`preflush` (within ``_PREFLUSH_FRESH_S``) it is skipped.
        The processes get SIGKILL while frozen (their writes are flushed and they are
        discarded anyway); the filesystem is made read-only from then on
        (:func:`seal_readonly`: a writer still exiting is waited out, finely) while the
        processes exit and the cgroups, then the veth (its name, and the address's route)
        go. The namespace, the unmount, the volume's loop device and FUSE process go in
        the background, and every later lifecycle call, and
        :meth:`wait_torn_down`, waits for that.

        On failure the domain is never left half-way: a freeze that does not complete is
        undone (the domain keeps running); any later failure tears everything down the
        ordinary way (the domain is stopped, its volume detached, so a resume starts it
        cleanly) before a :class:`DomainError` is raised.
        """
        async with self._lock:
            clock = StepClock()
            self._saved.desired = "stopped"
            self._save()
            clock.mark("save_state")
            if self.phase == "running":
                fresh = self._preflushed_at is not None and (
                    clock.now() - self._preflushed_at < _PREFLUSH_FRESH_S
                )
                if not fresh:
                    await self._preflush(clock)
                try:
                    await set_freezer(self._cg, "FROZEN", self.settings.stop_timeout_s)
                except (DomainError, OSError) as exc:
                    await self._unfreeze_after_failure()
                    raise _domain_error(f"domain {self.spec.name!r}: freeze failed", exc) from exc
                self.phase = "frozen"
                clock.mark("freeze")
            if self.phase != "frozen":  # not running: the plain stop (idempotent)
                await self._settle()
                await self._stop_locked(clock)
                self.timings["quiesce"] = clock.done()
                return
            try:
                await self._quiesce_frozen(clock)
            except BaseException as exc:
                with contextlib.suppress(EdgevisorError):
                    await self._tear_down()
                self.phase = "stopped"
                self.timings["quiesce"] = clock.done()
                if isinstance(exc, Exception) and not isinstance(exc, EdgevisorError):
                    raise _domain_error(f"domain {self.spec.name!r}: quiesce failed", exc) from exc
                raise
            self.phase = "stopped"
            self._hurry.clear()
            self._teardown = asyncio.get_running_loop().create_task(self._tear_down_later())
            self.timings["quiesce"] = clock.done()

    async def preflush(self) -> None:
        """Flush the running domain's volume ahead of a quiesce (see :meth:`_preflush`);
        a migration does it right before the switch, so the quiesce's own pass (and the
        downtime) finds almost nothing to write. Does nothing unless it runs."""
        async with self._lock:
            if self.phase != "running":
                return
            clock = StepClock()
            await self._preflush(clock)
            self._preflushed_at = clock.now()
            self.timings["preflush"] = clock.done()

    async def _preflush(self, clock: StepClock) -> None:
        """Flush while the domain still runs (not downtime): syncfs, a second one when
        the first took long (the domain kept writing), then the journal's checkpoint, so
        the flush after the freeze and the read-only remount (which writes every
        journaled block home) have little left. Best effort: the flush after the freeze
        is the one that counts."""
        try:
            for _ in range(2):
                t0 = clock.now()
                await asyncio.to_thread(syncfs, self.mnt)
                if clock.now() - t0 < _PREFLUSH_AGAIN_S:
                    break
            clock.mark("preflush")
            await asyncio.to_thread(checkpoint_journal, self.mnt)
            clock.mark("checkpoint")
        except OSError as exc:
            log.info("domain %s: flush before the freeze: %s", self.spec.qualified, exc)

    async def _unfreeze_after_failure(self) -> None:
        """A freeze that timed out leaves the group FREEZING (tasks that did freeze stay
        frozen): thaw it, so the domain that keeps running on this host is not stuck."""
        try:
            await set_freezer(self._cg, "THAWED", self.settings.stop_timeout_s)
        except (DomainError, OSError) as exc:
            log.warning("domain %s: thaw after a failed freeze: %s", self.spec.qualified, exc)

    async def _quiesce_frozen(self, clock: StepClock) -> None:
        """quiesce's part after the freeze (see :meth:`quiesce`); raises on failure and
        leaves the tearing down to the caller."""
        await asyncio.to_thread(syncfs, self.mnt)
        clock.mark("syncfs")
        self._stopping = True
        self.phase = "stopping"
        busy_s = self.settings.stop_timeout_s
        try:  # not waited for: the seal below and the groups' removal wait for the exits
            sigkill_all(self._cg)
        except OSError as exc:  # the groups' removal kills what is left
            log.warning("domain %s: kill: %s", self.spec.qualified, exc)
        clock.mark("kill")
        # The seal starts with the SIGKILLs, not after the exits: ext4's remount (an RCU
        # grace period, ~10 ms) then overlaps the tasks' exit and the groups' removal.
        # It is refused (EBUSY, retried finely) while any file on the filesystem is open
        # for writing, in any mount of it (the sandbox's bind too), so when it succeeds
        # nothing can write it any more: ext4 writes its journal home and a clean
        # superblock now, before the target mounts its copy (which reads ours), and
        # nothing writes the volume after. The unmount is deferred.
        t0 = clock.now()

        async def filesystem() -> None:
            await asyncio.to_thread(
                seal_readonly, self.mnt, busy_timeout_s=busy_s, poll_s=_SEAL_POLL_S
            )
            clock.since(t0, "readonly")

        async def processes_then_network() -> None:
            proc = self._proc
            if proc is not None and proc.poll() is None:  # bwrap's monitor (outside)
                proc.kill()
                await asyncio.to_thread(proc.wait, busy_s)
            sup, self._supervisor = self._supervisor, None
            if sup is not None and sup is not asyncio.current_task():
                sup.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await sup
            self._reap()  # killed and waited for: only forgets it
            # cgroup.procs hides a process once its exit began; removing the groups
            # succeeds only when every task has fully exited
            await asyncio.to_thread(self._cg.remove, busy_s)
            clock.since(t0, "cgroups")
            # Its name is the target's (it derives from the address): retired (down,
            # renamed; deleting takes ~20 ms) once the tasks' exit reset their clients'
            # connections over it (else a client waits out its own timeout).
            try:  # failing, the name stays ours: the teardown deletes the veth by it
                if self.ifname is not None:
                    got = await asyncio.to_thread(retire_link, self.ifname, self._retired)
                    self.ifname = self._retired if got else None
            except OSError as exc:
                log.warning("domain %s: veth %s: %s", self.spec.qualified, self.ifname, exc)
            clock.since(t0, "netns")

        results = await asyncio.gather(
            filesystem(), processes_then_network(), return_exceptions=True
        )
        clock.skip()
        for r in results:
            if isinstance(r, BaseException):
                raise r

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


def _domain_error(what: str, exc: BaseException) -> DomainError:
    """A failure as the typed error callers branch on (the cause's text kept)."""
    detail = exc.message if isinstance(exc, EdgevisorError) else f"{type(exc).__name__}: {exc}"
    return DomainError(f"{what}: {detail}")

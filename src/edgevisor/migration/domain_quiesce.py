"""A domain's freeze, thaw and quiesce (split out of :mod:`edgevisor.migration.domain`;
see its theory of operation): the source's share of a migration's switch."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from edgevisor.errors import Conflict, EdgevisorError
from edgevisor.migration.domain_host import (
    DomainError,
    checkpoint_journal,
    retire_link,
    seal_readonly,
    set_freezer,
    syncfs,
)
from edgevisor.migration.domain_parts import StepClock
from edgevisor.migration.domain_process import DomainProcess
from edgevisor.tasks.cgroups import CgroupError

__all__ = ["DomainQuiesce"]

log = logging.getLogger("edgevisor.migration.domain")  # one logger for a domain's records

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


class DomainQuiesce(DomainProcess):
    """Freeze, thaw and quiesce of a domain; mixed into ``Domain``."""

    ifname: str | None
    _retired: str
    _teardown: asyncio.Task[None] | None
    _hurry: asyncio.Event
    _preflushed_at: float | None
    timings: dict[str, dict[str, float]]

    async def _settle(self) -> None:
        raise NotImplementedError  # Domain's

    async def _stop_locked(self, clock: StepClock | None = None) -> None:
        raise NotImplementedError  # Domain's

    async def _tear_down_later(self) -> None:
        raise NotImplementedError  # Domain's

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
            self._cg.sigkill()
        except (CgroupError, OSError) as exc:  # the groups' removal kills what is left
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


def _domain_error(what: str, exc: BaseException) -> DomainError:
    """A failure as the typed error callers branch on (the cause's text kept)."""
    detail = exc.message if isinstance(exc, EdgevisorError) else f"{type(exc).__name__}: {exc}"
    return DomainError(f"{what}: {detail}")

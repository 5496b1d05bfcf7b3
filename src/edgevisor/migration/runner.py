"""The migration runner: performs the migration machine's commands on the controller.

Theory of operation
===================

One :class:`MigrationRunner` per controller (``runner_for(state)``); one asyncio task per
active migration (``_drive``). The task owns its :class:`~edgevisor.migration.machine.
Migration` and a queue of events; nothing else touches the machine, so no lock is needed:

* the task takes the next event from its queue, feeds it to ``handle(event, now)`` and
  performs the returned batch in order (``_apply``):
  - ``PersistPhase``: store ``to_dict()`` in the ``migrations`` row (and the domain row's
    host) *before* anything else of the batch — write-ahead, so a restart knows at least
    every effect that may have happened;
  - ``Wakeup(delay)``: a ``Tick`` is queued after ``delay``;
  - ``StopFill``: the fill's poller is cancelled (its late answer would be stale anyway);
  - commands that expect a reply: each becomes a small task (``_exec``) that performs it
    through the agent links and queues ``Done(cmd)`` or ``Failed(cmd, reason)``; an
    unreachable agent or a lost link is ``Failed(cmd, UNREACHABLE)``. Commands run as
    tasks so the drive loop keeps taking aborts, progress and host events while a long
    fill runs; a per-migration, per-host FIFO lock keeps one domain's commands one at a
    time on an agent, in the order the machine issued them.
* ``_watch_hosts`` turns host state changes the liveness reconciler records (``hosts.state``)
  into ``HostDown``/``HostUp`` events for every migration involving that host.
* an abort from the API is queued with a future, so the machine answers it in order with
  everything else (``AbortRefused`` after the commit).

The task ends when the machine is ``settled``. At controller start ``run_migrations``
loads every unsettled row, rebuilds the machine with ``from_dict`` and feeds ``resume``:
the machine decides whether to continue or roll back.

How commands map to agent ops (:mod:`edgevisor.agent.migration`): PrepareTarget =
``offer`` on the source, ``prepare`` on the target, then ``preflush`` on the source (best
effort: the running domain's volume is flushed right before the switch, so the
quiesce, inside the downtime, has little left to write); SetRoles = ``set_role`` on the
new primary (the fence; its answer decides ``Done``) then, best effort and in the
background (off the switch's critical path), on the other;
StartFill = ``serving`` (the target holds the fill at its trickle until the domain
listens, bounded by its ``domains.fill_hold_s``), ``fill``, then ``progress`` polls
(``Progress`` events) until every block is present; ReleaseSource = ``finish`` on the
target (mirroring ends) then ``release`` on the source. MoveRecord moves the domain's
address record to the host named (the address API's move, with fencing: the host giving
the record up is pushed first); a record already there is left alone, so a retry or an
undo of a move that never happened is harmless. Only domains with a logical address get
MoveRecord (``MigrationSpec.has_address``); the target learns the address at ``prepare``
(from the controller's domain row), so the domain's namespace there carries the same
logical address.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Iterable
from dataclasses import asdict
from typing import Any, Final

from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from edgevisor.control.state import ControllerState
from edgevisor.errors import EdgevisorError, NotFound, UnavailableError
from edgevisor.migration.commands import (
    AbortRequested,
    Command,
    Done,
    Event,
    Failed,
    HostDown,
    HostUp,
    MigrationRefused,
    MigrationSpec,
    Mode,
    PersistPhase,
    Phase,
    Progress,
    SetRoles,
    StartFill,
    StopFill,
    Tick,
    Wakeup,
)
from edgevisor.migration.machine import UNREACHABLE, Migration, admit
from edgevisor.migration.perform import AbortAsk, Job, Performer
from edgevisor.store import repos
from edgevisor.store.domain_models import Domain
from edgevisor.store.migration_models import MigrationRecord
from edgevisor.store.models import Account

__all__ = ["MigrationRunner", "run_migrations", "runner_for"]

log = logging.getLogger(__name__)

POLL_S: Final = 0.25
"""Fill progress polls and host-state checks."""
PUBLISH_EVERY_S: Final = 0.5
"""Progress events on the SSE stream at most this often (phase changes always)."""
_ON_TARGET_PHASES: Final = frozenset({Phase.POST_SYNC, Phase.VERIFYING, Phase.COMMITTED})

_RUNNERS: dict[int, MigrationRunner] = {}


def runner_for(st: ControllerState) -> MigrationRunner:
    """The runner of this controller (created on first use)."""
    r = _RUNNERS.get(id(st))
    if r is None or r.st is not st:
        r = _RUNNERS[id(st)] = MigrationRunner(st)
    return r


async def run_migrations(st: ControllerState) -> None:
    """Background loop (``BACKGROUND_LOOPS``): resume persisted migrations, watch hosts."""
    runner = runner_for(st)
    try:
        await runner.run()
    finally:
        _RUNNERS.pop(id(st), None)


class MigrationRunner:
    """Runs every active migration of one controller (see the module docstring)."""

    def __init__(self, st: ControllerState, *, poll_s: float = POLL_S) -> None:
        self.st = st
        self.poll_s = poll_s
        self.jobs: dict[str, Job] = {}
        self.trace: dict[str, list[str]] = {}
        """Kinds of the commands performed, per migration (tests assert the sequence)."""
        self.timings: dict[str, list[tuple[str, float]]] = {}
        """Seconds each command that succeeded took, per migration (benchmarks)."""
        self.spans: dict[str, list[tuple[str, float, float]]] = {}
        """Per migration: (command, issued, done) on ``time.monotonic`` for each command
        that succeeded (benchmarks line them up with a client's view of the switch)."""
        self.performer = Performer(st, poll_s=poll_s)
        self.fill_s = self.performer.fill_s
        """Per migration: lazy volume created -> every block present, on the target."""
        self.fill_held_s = self.performer.fill_held_s
        """Per migration: how long the target held the fill for the domain's start-up."""
        self._admit_lock = asyncio.Lock()
        self.loop: asyncio.AbstractEventLoop | None = None

    # -- public API --------------------------------------------------------------------

    async def run(self) -> None:
        """Resume what the store says is unsettled, then watch hosts until cancelled."""
        self.loop = asyncio.get_running_loop()
        try:
            while True:
                try:
                    await self.resume_all()
                    break
                except Exception:  # e.g. the store is not reachable yet
                    log.exception("resuming migrations failed; retrying")
                    await asyncio.sleep(max(self.poll_s, 1.0))
            while True:
                try:
                    await self._watch_hosts()
                except Exception:  # the loop must outlive a transient store error
                    log.exception("migration host watch failed; retrying")
                await asyncio.sleep(self.poll_s)
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        """Stop driving (the persisted state lets the next controller resume)."""
        for job in list(self.jobs.values()):
            tasks = [*job.tasks, *job.fills]
            if job.driver is not None:
                tasks.append(job.driver)
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(BaseException):
                    await t
        self.jobs.clear()

    async def resume_all(self) -> list[str]:
        rows = await run_in_threadpool(self._unsettled_rows)
        started = []
        for mid, account_id, account, name, state in rows:
            if mid in self.jobs:
                continue
            try:
                m = Migration.from_dict(state)
            except (ValueError, KeyError, TypeError) as exc:
                log.error("migration %s cannot be resumed: %s", mid, exc)
                continue
            job = Job(m, account_id, account, name, created_at=self.st.clock())
            job.last_phase = m.phase
            cmds = m.resume(self.st.clock())
            self._launch(job, cmds)
            started.append(mid)
            log.info("migration %s of %s resumed in phase %s", mid, name, m.phase)
        return started

    async def submit(
        self,
        account: Account,
        name: str,
        target: str,
        *,
        mode: Mode = Mode.POST_COPY,
        rate_bytes_s: int | None = None,
    ) -> dict[str, Any]:
        """Admit and start a migration; raises (nothing changed) when refused."""
        async with self._admit_lock:
            spec, domain = await run_in_threadpool(
                self._admission, account, name, target, mode, rate_bytes_s
            )
            m = Migration(spec)
            job = Job(m, account.id, account.name, name, created_at=self.st.clock())
            cmds = m.start(self.st.clock())
            await run_in_threadpool(self._insert, job, domain)
            self._launch(job, cmds)
        self._publish(job, "migration.started")
        return self.info(job)

    async def abort(self, migration_id: str) -> dict[str, Any]:
        """Ask the machine to roll back; raises ``AbortRefused`` after the commit."""
        job = self.jobs.get(migration_id)
        if job is None:
            row = await run_in_threadpool(self._row_info, migration_id)
            if row["settled"] and row["phase"] == Phase.COMMITTED:
                from edgevisor.migration.commands import AbortRefused

                raise AbortRefused(f"migration {migration_id} is committed")
            return row
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        job.queue.put_nowait(AbortAsk(fut))
        await fut
        return self.info(job)

    def info(self, job: Job) -> dict[str, Any]:
        s = job.m.status()
        out = asdict(s)
        out.pop("migration_id")
        out.update(
            id=job.m.spec.migration_id, domain=job.name, account=job.account,
            source=job.m.spec.source, target=job.m.spec.target, mode=str(job.m.spec.mode),
            phase=str(s.phase), cause=str(s.cause) if s.cause else None,
            settled=_settled(job.m), created_at=job.created_at, updated_at=self.st.clock(),
        )  # fmt: skip
        return out

    def lookup(self, migration_id: str) -> dict[str, Any] | None:
        job = self.jobs.get(migration_id)
        return self.info(job) if job is not None else None

    async def wait_settled(self, migration_id: str, timeout_s: float) -> None:
        job = self.jobs.get(migration_id)
        if job is not None and job.driver is not None:
            await asyncio.wait_for(asyncio.shield(job.driver), timeout_s)

    # -- store -------------------------------------------------------------------------

    def _unsettled_rows(self) -> list[tuple[str, int, str, str, dict[str, Any]]]:
        with self.st.store.session() as s:
            rows = s.scalars(select(MigrationRecord).where(MigrationRecord.settled.is_(False)))
            names = {a.id: a.name for a in repos.list_accounts(s)}
            return [
                (r.id, r.account_id, names.get(r.account_id, "?"), r.domain, dict(r.state))
                for r in rows
            ]

    def _admission(
        self, account: Account, name: str, target: str, mode: Mode, rate: int | None
    ) -> tuple[MigrationSpec, int]:
        with self.st.store.session() as s:
            d = s.scalar(select(Domain).where(Domain.account_id == account.id, Domain.name == name))
            if d is None:
                raise NotFound(f"domain {name!r} not found in account {account.name!r}")
            hosts = {h.name: h for h in repos.list_hosts(s)}
            busy = s.scalar(
                select(MigrationRecord).where(
                    MigrationRecord.account_id == account.id,
                    MigrationRecord.domain == name,
                    MigrationRecord.settled.is_(False),
                )
            )
            if busy is not None:
                why = (
                    f"cleanup on {busy.target!r} is pending"
                    if busy.phase in ("aborted", "failed_back")
                    else "it is already migrating"
                )
                raise MigrationRefused(
                    f"domain {name!r} cannot migrate: {why} ({busy.id}, {busy.phase})"
                )
            spec = MigrationSpec(
                migration_id=uuid.uuid4().hex[:16],
                domain=f"{account.name}.{name}",
                source=d.host,
                target=target,
                volume_bytes=d.volume_size_bytes,
                mode=mode,
                has_address=d.address_record_id is not None,
                rate_bytes_s=rate,
            )
            admit(
                spec,
                hosts_up={n: h.state == "up" for n, h in hosts.items()},
                active=[j.m for j in self.jobs.values()],
            )
            room = hosts[target].disk_mb
            if room and room * (1 << 20) < d.volume_size_bytes:
                raise MigrationRefused(
                    f"host {target!r} has {room} MiB free; the volume needs "
                    f"{d.volume_size_bytes >> 20} MiB"
                )
            return spec, d.id

    def _insert(self, job: Job, domain_id: int) -> None:
        now = self.st.clock()
        spec = job.m.spec
        with self.st.store.session() as s:
            row = MigrationRecord(
                id=spec.migration_id, account_id=job.account_id, domain=job.name,
                source=spec.source, target=spec.target, mode=str(spec.mode),
                phase=str(job.m.phase), settled=False, volume_bytes=spec.volume_bytes,
                state=job.m.to_dict(), created_at=now, updated_at=now,
            )  # fmt: skip
            s.add(row)

    def _persist(self, job: Job) -> None:
        m = job.m
        now = self.st.clock()
        with self.st.store.session() as s:
            row = s.get(MigrationRecord, m.spec.migration_id)
            if row is None:
                return
            row.state = m.to_dict()
            row.phase = str(m.phase)
            row.settled = _settled(m)
            row.updated_at = now
            d = s.scalar(
                select(Domain).where(Domain.account_id == job.account_id, Domain.name == job.name)
            )
            if d is not None:
                d.host = m.spec.target if m.phase in _ON_TARGET_PHASES else m.spec.source
                d.role = "primary"
                d.updated_at = now

    def _row_info(self, migration_id: str) -> dict[str, Any]:
        with self.st.store.session() as s:
            row = s.get(MigrationRecord, migration_id)
            if row is None:
                raise NotFound(f"migration {migration_id!r} not found")
            account = s.get(Account, row.account_id)
            return row_info(row, account.name if account else "?")

    # -- driving -----------------------------------------------------------------------

    def _launch(self, job: Job, first: list[Command]) -> None:
        m = job.m
        job.hosts_up = {m.spec.source: m.source_up, m.spec.target: m.target_up}
        self.jobs[m.spec.migration_id] = job
        job.driver = asyncio.get_running_loop().create_task(self._drive(job, first))

    async def _drive(self, job: Job, first: list[Command]) -> None:
        m = job.m
        try:
            await self._apply(job, first)
            # Cleanup skipped on a dead target (leftovers) is done when it returns: its
            # agent may restart the domain there, so the driver waits for it.
            while not _settled(m):
                ev = await job.queue.get()
                if isinstance(ev, AbortAsk):
                    try:
                        cmds = m.handle(AbortRequested(), self.st.clock())
                    except EdgevisorError as exc:  # AbortRefused: nothing changed
                        ev.fut.set_exception(exc)
                        continue
                    await self._apply(job, cmds)
                    ev.fut.set_result(None)
                else:
                    await self._apply(job, m.handle(ev, self.st.clock()))
                self._maybe_publish(job, isinstance(ev, Progress))
            self._publish(job, "migration.settled")
            log.info("migration %s of %s settled: %s", m.spec.migration_id, job.name, m.phase)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("migration %s: runner crashed; it resumes at the next start",
                          m.spec.migration_id)  # fmt: skip
        finally:
            for t in [*job.tasks, *job.fills]:
                t.cancel()
            if self.jobs.get(m.spec.migration_id) is job:
                del self.jobs[m.spec.migration_id]
            while not job.queue.empty():  # nobody answers aborts queued after the end
                ev = job.queue.get_nowait()
                if isinstance(ev, AbortAsk) and not ev.fut.done():
                    ev.fut.set_result(None)

    async def _apply(self, job: Job, cmds: Iterable[Command]) -> None:
        loop = asyncio.get_running_loop()
        trace = self.trace.setdefault(job.m.spec.migration_id, [])
        for cmd in cmds:
            if not isinstance(cmd, PersistPhase):
                trace.append(_label(cmd))
            if isinstance(cmd, PersistPhase):
                await run_in_threadpool(self._persist, job)
            elif isinstance(cmd, Wakeup):
                loop.call_later(cmd.delay_s, job.queue.put_nowait, Tick())
            elif isinstance(cmd, StopFill):
                for t in list(job.fills):
                    t.cancel()
            elif cmd.expects_reply:
                t = loop.create_task(self._exec(job, cmd))
                job.tasks.add(t)
                t.add_done_callback(job.tasks.discard)
                if isinstance(cmd, StartFill):
                    job.fills.add(t)
                    t.add_done_callback(job.fills.discard)
            else:
                log.warning("migration runner: unknown command %r", cmd)

    async def _exec(self, job: Job, cmd: Command) -> None:
        t0 = time.monotonic()
        try:
            await self.performer.perform(job, cmd)
            ev: Event = Done(cmd)
            t1 = time.monotonic()
            mid = job.m.spec.migration_id
            self.timings.setdefault(mid, []).append((_label(cmd), t1 - t0))
            self.spans.setdefault(mid, []).append((_label(cmd), t0, t1))
        except asyncio.CancelledError:
            raise
        except UnavailableError as exc:
            log.info("migration %s: %s unreachable: %s", job.m.spec.migration_id, cmd.kind, exc)
            ev = Failed(cmd, UNREACHABLE)
        except EdgevisorError as exc:
            ev = Failed(cmd, f"{exc.code}: {exc.message}")
        except Exception as exc:  # a bug or an unexpected answer: fail the step, visibly
            log.exception("migration %s: %s failed", job.m.spec.migration_id, cmd.kind)
            ev = Failed(cmd, f"{type(exc).__name__}: {exc}")
        job.queue.put_nowait(ev)

    # -- hosts and events --------------------------------------------------------------

    async def _watch_hosts(self) -> None:
        if not self.jobs:
            return
        states = await run_in_threadpool(self._host_states)
        for job in list(self.jobs.values()):
            for host, was_up in list(job.hosts_up.items()):
                up = states.get(host, False)
                if up != was_up:
                    job.hosts_up[host] = up
                    job.queue.put_nowait(HostUp(host) if up else HostDown(host))

    def _host_states(self) -> dict[str, bool]:
        with self.st.store.session() as s:
            return {h.name: h.state == "up" for h in repos.list_hosts(s)}

    def _maybe_publish(self, job: Job, progress: bool) -> None:
        now = time.monotonic()
        if job.m.phase != job.last_phase:
            job.last_phase = job.m.phase
            self._publish(job, "migration.phase")
        elif progress and now - job.last_publish >= PUBLISH_EVERY_S:
            self._publish(job, "migration.progress")
        else:
            return
        job.last_publish = now

    def _publish(self, job: Job, kind: str) -> None:
        try:
            self.st.publish(kind, subject=job.name, account_id=job.account_id,
                            data=self.info(job))  # fmt: skip
        except Exception:  # events are best effort; the row is the truth
            log.exception("cannot publish %s", kind)


def _settled(m: Migration) -> bool:
    """The machine's ``settled``, and no cleanup left on a dead target either."""
    return m.settled and (m.released or not m.leftovers)


def _label(cmd: Command) -> str:
    if isinstance(cmd, SetRoles):
        return f"SetRoles({cmd.primary})"
    return cmd.kind


def row_info(row: MigrationRecord, account: str) -> dict[str, Any]:
    """A stored migration as the API shows it (for settled ones, or after a restart)."""
    try:
        status = asdict(Migration.from_dict(row.state).status())
    except (ValueError, KeyError, TypeError):
        status = {"present_bytes": 0, "total_bytes": row.volume_bytes, "rate_bytes_s": None,
                  "eta_s": None, "downtime_s": None, "blocked_on": None, "cause": None,
                  "reason": "unreadable state", "settled": row.settled}  # fmt: skip
    status.pop("migration_id", None)
    status.pop("phase", None)
    status["settled"] = row.settled
    cause = status.get("cause")
    status.update(
        id=row.id, domain=row.domain, account=account, source=row.source, target=row.target,
        mode=row.mode, phase=row.phase, cause=str(cause) if cause else None,
        created_at=row.created_at, updated_at=row.updated_at,
    )  # fmt: skip
    return status

"""How the migration runner performs a command: the agent calls of each command kind.

The runner (:mod:`.runner`) drives the pure machine and persists it; this is its I/O
edge towards the hosts. Calls to one host are serialised per migration (``Job.lock``), so
commands reach a host in the order the machine issued them.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, Final

from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from edgevisor.control import domain_net
from edgevisor.control.state import ControllerState
from edgevisor.errors import EdgevisorError, UnavailableError
from edgevisor.migration.commands import (
    Command,
    DiscardTarget,
    Event,
    MoveRecord,
    Phase,
    PrepareTarget,
    Progress,
    QuiesceSource,
    ReleaseSource,
    ResumeOnSource,
    ResyncSource,
    SetRoles,
    StartFill,
    StartOnTarget,
    StopTarget,
    Verify,
)
from edgevisor.migration.machine import Migration
from edgevisor.store.domain_models import Domain

__all__ = ["TIMEOUTS", "AbortAsk", "Job", "Performer"]

log = logging.getLogger(__name__)

TIMEOUTS: Final = {"default": 60.0, "quiesce": 120.0, "start": 180.0, "discard": 120.0,
                    "serving": 40.0}  # fmt: skip


@dataclass
class AbortAsk:
    fut: asyncio.Future[None]


@dataclass
class Job:
    m: Migration
    account_id: int
    account: str
    name: str
    queue: asyncio.Queue[Event | AbortAsk] = field(default_factory=asyncio.Queue)
    locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    fills: set[asyncio.Task[None]] = field(default_factory=set)
    hosts_up: dict[str, bool] = field(default_factory=dict)
    created_at: float = 0.0
    last_phase: Phase | None = None
    last_publish: float = 0.0
    driver: asyncio.Task[None] | None = None
    hot: list[Any] = field(default_factory=list)
    """The source's hot set (groups of ranges, its ``preflush`` answer): the target
    prefetches it at StartOnTarget. In memory only (a hint: lost on a restart)."""

    def lock(self, host: str) -> asyncio.Lock:
        return self.locks.setdefault(host, asyncio.Lock())

    @property
    def who(self) -> dict[str, str]:
        return {"account": self.account, "name": self.name}


class Performer:
    """Performs the machine's commands on the hosts (see the module doc)."""

    def __init__(self, st: ControllerState, *, poll_s: float) -> None:
        self.st = st
        self.poll_s = poll_s
        self.fill_s: dict[str, float] = {}
        self.fill_held_s: dict[str, float] = {}

    async def call(
        self, job: Job, host: str, op: str, extra: dict[str, Any] | None = None,
        *, timeout_s: float | None = None,
    ) -> Any:  # fmt: skip
        payload = {**job.who, **(extra or {})}
        async with job.lock(host):
            return await self.st.links.call(
                host, f"migration.{op}", payload,
                timeout_s=timeout_s or TIMEOUTS.get(op, TIMEOUTS["default"]),
            )  # fmt: skip

    async def perform(self, job: Job, cmd: Command) -> None:
        spec = job.m.spec
        src, dst = spec.source, spec.target
        bulk = max(120.0, spec.volume_bytes / (20 << 20))  # reads the volume: >= 20 MB/s
        if isinstance(cmd, PrepareTarget):
            offer = await self.call(job, src, "offer", {"peer": dst})
            addr = await run_in_threadpool(self._address, job) if spec.has_address else None
            await self.call(
                job, dst, "prepare",
                {**offer, "rate_bytes_s": spec.rate_bytes_s, "lazy": cmd.lazy,
                 "address": addr[1] if addr else None,
                 "instance": domain_net.instance_name(job.account, job.name)},
            )  # fmt: skip
            try:
                pre = await self.call(job, src, "preflush")
                hot = pre.get("hot") if isinstance(pre, dict) else None
                job.hot = hot if isinstance(hot, list) else []
            except EdgevisorError as exc:  # only an optimization: the quiesce flushes too
                log.info("migration %s: no flush ahead of the switch: %s",
                         job.m.spec.migration_id, exc)  # fmt: skip
        elif isinstance(cmd, QuiesceSource):
            await self.call(job, src, "quiesce")
        elif isinstance(cmd, SetRoles):
            # The fence is on the primary and its answer alone decides Done; the other
            # side follows when it can, off the switch's critical path (its host lock,
            # taken before any later command's, keeps its order on that host).
            await self.call(job, cmd.primary, "set_role", {"role": "primary"})
            t = asyncio.get_running_loop().create_task(self._demote(job, cmd.secondary))
            job.tasks.add(t)
            t.add_done_callback(job.tasks.discard)
        elif isinstance(cmd, StartOnTarget):
            await self.call(job, dst, "start", {"prefetch": job.hot})
        elif isinstance(cmd, MoveRecord):
            addr = await run_in_threadpool(self._address, job)
            if addr is not None:
                await domain_net.move_record(self.st, job.account, addr[0], cmd.to_host)
        elif isinstance(cmd, StartFill):
            await self._fill(job, cmd)
        elif isinstance(cmd, Verify):
            await self.call(job, dst, "verify", timeout_s=bulk)
        elif isinstance(cmd, ReleaseSource):
            await self.call(job, dst, "finish")
            await self.call(job, src, "release")
        elif isinstance(cmd, ResyncSource):
            await self.call(job, dst, "resync", timeout_s=bulk)
        elif isinstance(cmd, StopTarget):
            await self.call(job, dst, "stop_target", timeout_s=TIMEOUTS["quiesce"])
        elif isinstance(cmd, ResumeOnSource):
            await self.call(job, src, "resume", timeout_s=TIMEOUTS["start"])
        elif isinstance(cmd, DiscardTarget):
            await self.call(job, dst, "discard")
        else:
            raise AssertionError(f"no way to perform {cmd!r}")

    async def _demote(self, job: Job, host: str) -> None:
        try:
            await self.call(job, host, "set_role", {"role": "secondary"})
        except EdgevisorError as exc:
            log.info("migration %s: %s stays as it was for now: %s",
                     job.m.spec.migration_id, host, exc)  # fmt: skip

    async def _fill(self, job: Job, cmd: StartFill) -> None:
        dst = job.m.spec.target
        await self._hold_fill(job, dst)
        p = await self.call(job, dst, "fill", {"rate_bytes_s": cmd.rate_bytes_s})
        misses = 0
        while True:
            job.queue.put_nowait(Progress(int(p["present_bytes"]), int(p["total_bytes"])))
            if p["done"]:
                if p.get("fill_s") is not None:
                    self.fill_s[job.m.spec.migration_id] = float(p["fill_s"])
                return
            await asyncio.sleep(self.poll_s)
            try:
                p = await self.call(job, dst, "progress")
                misses = 0
            except UnavailableError:
                misses += 1  # a lost poll is not a lost fill; a dead host shows in liveness
                if misses >= 20:
                    raise

    async def _hold_fill(self, job: Job, dst: str) -> None:
        """Let the domain's start-up on the target finish before the fill takes the link
        and the CPU (the agent bounds the wait). Best effort: an agent that cannot tell
        (or is unreachable: the fill's own call then fails) does not hold it."""
        mid = job.m.spec.migration_id
        try:
            r = await self.call(job, dst, "serving", timeout_s=TIMEOUTS["serving"])
        except EdgevisorError as exc:
            log.info("migration %s: fill not held: %s", mid, exc)
            return
        if isinstance(r, dict) and isinstance(r.get("waited_s"), int | float):
            self.fill_held_s[mid] = float(r["waited_s"])

    def _address(self, job: Job) -> tuple[int, str] | None:
        """The domain's address record id and logical address (None: it has none)."""
        with self.st.store.session() as s:
            d = s.scalar(
                select(Domain).where(Domain.account_id == job.account_id, Domain.name == job.name)
            )
            if d is None or d.address_record_id is None or d.address is None:
                return None
            return d.address_record_id, d.address

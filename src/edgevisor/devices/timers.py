"""Timers: cron schedules that call tasks; a pure core, a SQLite store and an async loop.

A timer is a cron expression (croniter syntax, evaluated in UTC; 5 fields, or 6 with
seconds last), a task name, an event payload and a missed-run policy. The task is called
through the same ``call_task(task, event)`` callback routes use, with the event::

    {"timer": name, "scheduled_at": <epoch s>, "late": <bool>, "payload": <timer event>}

Theory of operation. The core holds, per timer, ``next_run`` (epoch seconds). ``due(now)``
returns a :class:`Fire` for every timer with ``next_run <= now`` and moves ``next_run`` to
the first cron time after ``now`` — a loop that woke late fires once, not in a burst. The
store persists ``next_run`` after every change, so a restart knows what was missed.

Missed runs (:meth:`TimerCore.start`, applied once when the agent starts): all cron times in
``[persisted next_run, now]`` were missed while the agent was down. Policy per timer:

- ``skip``: none of them runs;
- ``run-once``: one run, for the latest missed time;
- ``run-all``: each missed time runs, oldest first, at most ``max_catchup`` of them (the
  latest ones if more were missed); fires beyond the cap are counted as skipped
  (counted up to 10,000 per timer, so the count is a lower bound after long outages).

Missed fires have ``late=True``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from croniter import croniter

from edgevisor.errors import NotFound, RequestError

__all__ = ["Fire", "MissedPolicy", "Timer", "TimerCore", "TimerRunner", "TimerStore"]

log = logging.getLogger(__name__)

_COUNT_LIMIT = 10_000  # missed runs counted per timer and start; beyond, "at least"


class MissedPolicy(StrEnum):
    SKIP = "skip"
    RUN_ONCE = "run-once"
    RUN_ALL = "run-all"


@dataclass(frozen=True, slots=True)
class Timer:
    name: str
    cron: str
    task: str
    event: dict[str, Any] = field(default_factory=dict)
    missed: MissedPolicy = MissedPolicy.SKIP
    max_catchup: int = 10

    def validate(self) -> Timer:
        if not self.name:
            raise RequestError("timer name must not be empty")
        if not croniter.is_valid(self.cron):
            raise RequestError(f"timer {self.name}: invalid cron expression {self.cron!r}")
        if self.max_catchup < 1:
            raise RequestError(f"timer {self.name}: max_catchup must be at least 1")
        MissedPolicy(self.missed)
        return self

    def next_after(self, t: float) -> float:
        return float(croniter(self.cron, t).get_next(float))

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "cron": self.cron,
            "task": self.task,
            "event": self.event,
            "missed": self.missed.value,
            "max_catchup": self.max_catchup,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Timer:
        return cls(
            name=str(obj["name"]),
            cron=str(obj["cron"]),
            task=str(obj["task"]),
            event=dict(obj.get("event") or {}),
            missed=MissedPolicy(obj.get("missed", "skip")),
            max_catchup=int(obj.get("max_catchup", 10)),
        ).validate()


@dataclass(frozen=True, slots=True)
class Fire:
    timer: str
    task: str
    scheduled_at: float
    late: bool
    payload: dict[str, Any]

    def event(self) -> dict[str, Any]:
        return {
            "timer": self.timer,
            "scheduled_at": self.scheduled_at,
            "late": self.late,
            "payload": self.payload,
        }


@dataclass
class TimerCore:
    """Pure scheduling state: timers and their next run times."""

    timers: dict[str, Timer] = field(default_factory=dict)
    next_run: dict[str, float] = field(default_factory=dict)
    skipped: int = 0

    def add(self, timer: Timer, now: float, next_run: float | None = None) -> None:
        timer.validate()
        self.timers[timer.name] = timer
        self.next_run[timer.name] = next_run if next_run is not None else timer.next_after(now)

    def remove(self, name: str) -> None:
        if self.timers.pop(name, None) is None:
            raise NotFound(f"no timer named {name!r}")
        self.next_run.pop(name, None)

    def start(self, now: float) -> list[Fire]:
        """Apply each timer's missed-run policy; call once, before the first ``due``."""
        fires: list[Fire] = []
        for name in sorted(self.timers):
            timer = self.timers[name]
            nxt = self.next_run[name]
            if nxt > now:
                continue
            cap = timer.max_catchup if timer.missed is MissedPolicy.RUN_ALL else 1
            # The latest `cap` missed times, walking back from now: an agent down for a
            # year with a per-second timer must not iterate over every missed second.
            latest: list[float] = []
            back = croniter(timer.cron, now + 1.0)
            while len(latest) < cap:
                t = float(back.get_prev(float))
                if t < nxt:
                    break
                if t <= now:
                    latest.append(t)
            latest.reverse()
            total = self._count_missed(timer, nxt, now)
            if timer.missed is MissedPolicy.SKIP:
                latest = []
            self.skipped += max(total - len(latest), 0)
            fires += [Fire(name, timer.task, m, True, timer.event) for m in latest]
            self.next_run[name] = timer.next_after(now)
        return fires

    @staticmethod
    def _count_missed(timer: Timer, first: float, now: float) -> int:
        """Missed runs in ``[first, now]``, counted up to ``_COUNT_LIMIT``."""
        total, t = 0, first
        while t <= now and total < _COUNT_LIMIT:
            total += 1
            t = timer.next_after(t)
        return total

    def due(self, now: float) -> list[Fire]:
        fires: list[Fire] = []
        for name in sorted(self.timers):
            nxt = self.next_run[name]
            if nxt <= now:
                timer = self.timers[name]
                fires.append(Fire(name, timer.task, nxt, False, timer.event))
                self.next_run[name] = timer.next_after(max(nxt, now))
        return fires

    def next_wakeup(self) -> float | None:
        return min(self.next_run.values(), default=None)


class TimerStore:
    """Timers and their next run times in the device database."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        conn.execute(
            "CREATE TABLE IF NOT EXISTS timers ("
            " name TEXT PRIMARY KEY, spec TEXT NOT NULL, next_run REAL NOT NULL)"
        )

    def load(self, core: TimerCore, now: float) -> None:
        for name, spec, nxt in self._conn.execute("SELECT name, spec, next_run FROM timers"):
            try:
                core.add(Timer.from_json(json.loads(spec)), now, next_run=float(nxt))
            except (RequestError, ValueError, KeyError) as exc:
                log.error("timer %s in the store is invalid, ignored: %s", name, exc)

    def save(self, timer: Timer, next_run: float) -> None:
        self._conn.execute(
            "INSERT INTO timers (name, spec, next_run) VALUES (?, ?, ?)"
            " ON CONFLICT(name) DO UPDATE SET spec = excluded.spec, next_run = excluded.next_run",
            (timer.name, json.dumps(timer.to_json()), next_run),
        )

    def save_next_runs(self, next_run: dict[str, float]) -> None:
        self._conn.executemany(
            "UPDATE timers SET next_run = ? WHERE name = ?",
            [(t, n) for n, t in next_run.items()],
        )

    def delete(self, name: str) -> None:
        self._conn.execute("DELETE FROM timers WHERE name = ?", (name,))


CallTask = Callable[[str, dict[str, Any]], Awaitable[Any]]


class TimerRunner:
    """Runs the core against the wall clock and calls tasks; I/O lives here only."""

    def __init__(
        self,
        core: TimerCore,
        store: TimerStore,
        call_task: CallTask,
        *,
        clock: Callable[[], float] = time.time,
        max_sleep_s: float = 30.0,
    ) -> None:
        self.core = core
        self.store = store
        self.call_task = call_task
        self.clock = clock
        self.max_sleep_s = max_sleep_s
        self.fired = 0
        self.failed = 0
        self._wake = asyncio.Event()
        self._calls: set[asyncio.Task[None]] = set()

    def poke(self) -> None:
        """Re-evaluate now (after a timer was added or removed)."""
        self._wake.set()

    def _spawn(self, fires: list[Fire]) -> None:
        for fire in fires:
            task = asyncio.create_task(self._call(fire))
            self._calls.add(task)
            task.add_done_callback(self._calls.discard)

    async def _call(self, fire: Fire) -> None:
        self.fired += 1
        try:
            await self.call_task(fire.task, fire.event())
        except Exception as exc:
            self.failed += 1
            log.warning("timer %s: task %s failed: %r", fire.timer, fire.task, exc)

    async def run(self) -> None:
        fires = self.core.start(self.clock())
        self.store.save_next_runs(self.core.next_run)
        self._spawn(fires)
        try:
            while True:
                self._wake.clear()  # before due(): a poke from here on is not lost
                fires = self.core.due(self.clock())
                if fires:
                    self.store.save_next_runs(self.core.next_run)
                    self._spawn(fires)
                wake = self.core.next_wakeup()
                delay = self.max_sleep_s if wake is None else wake - self.clock()
                delay = min(max(delay, 0.0), self.max_sleep_s)
                # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancel.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._wake.wait()
        finally:
            for task in list(self._calls):
                task.cancel()

"""Timers: the pure due/start core, persistence of next runs, the async loop."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from edgevisor.devices.db import open_db
from edgevisor.devices.timers import (
    Fire,
    MissedPolicy,
    Timer,
    TimerCore,
    TimerRunner,
    TimerStore,
)
from edgevisor.errors import NotFound, RequestError

MIN = 60.0
T0 = 1_700_000_040.0  # a whole minute (UTC)


def _every_minute(
    name: str = "t", missed: MissedPolicy = MissedPolicy.SKIP, cap: int = 10
) -> Timer:
    return Timer(name, "* * * * *", "task", {"k": 1}, missed, cap)


def test_devices_due_fires_once_and_advances() -> None:
    core = TimerCore()
    core.add(_every_minute(), T0)
    assert core.next_run["t"] == T0 + MIN
    assert core.due(T0 + 30) == []
    assert core.due(T0 + MIN) == [Fire("t", "task", T0 + MIN, False, {"k": 1})]
    assert core.next_run["t"] == T0 + 2 * MIN
    # A loop that wakes 5 minutes late fires once, not five times.
    fires = core.due(T0 + 7 * MIN)
    assert [f.scheduled_at for f in fires] == [T0 + 2 * MIN]
    assert core.next_run["t"] == T0 + 8 * MIN
    assert core.next_wakeup() == T0 + 8 * MIN


@pytest.mark.parametrize(
    ("policy", "cap", "expected", "skipped"),
    [
        (MissedPolicy.SKIP, 10, [], 5),
        (MissedPolicy.RUN_ONCE, 10, [5], 4),
        (MissedPolicy.RUN_ALL, 10, [1, 2, 3, 4, 5], 0),
        (MissedPolicy.RUN_ALL, 2, [4, 5], 3),
    ],
)
def test_devices_missed_run_policies(
    policy: MissedPolicy, cap: int, expected: list[int], skipped: int
) -> None:
    core = TimerCore()
    # Persisted next run was T0+1min; the agent comes back at T0+5.5min: 5 runs missed.
    core.add(_every_minute(missed=policy, cap=cap), T0, next_run=T0 + MIN)
    fires = core.start(T0 + 5.5 * MIN)
    assert [round((f.scheduled_at - T0) / MIN) for f in fires] == expected
    assert all(f.late for f in fires)
    assert core.skipped == skipped
    assert core.next_run["t"] == T0 + 6 * MIN


def test_devices_invalid_timers() -> None:
    core = TimerCore()
    with pytest.raises(RequestError):
        core.add(Timer("t", "not cron", "task"), T0)
    with pytest.raises(RequestError):
        core.add(Timer("t", "* * * * *", "task", max_catchup=0), T0)
    with pytest.raises(NotFound):
        core.remove("ghost")


def test_devices_timer_store_round_trip(tmp_path: Path) -> None:
    conn = open_db(tmp_path / "d.db")
    store = TimerStore(conn)
    timer = _every_minute(missed=MissedPolicy.RUN_ONCE)
    store.save(timer, T0 + MIN)
    store.save_next_runs({"t": T0 + 3 * MIN})
    core = TimerCore()
    TimerStore(open_db(tmp_path / "d.db")).load(core, T0)
    assert core.timers["t"] == timer
    assert core.next_run["t"] == T0 + 3 * MIN


async def test_devices_timer_runner_calls_tasks_and_persists(tmp_path: Path) -> None:
    calls: list[tuple[str, dict[str, Any]]] = []
    got = asyncio.Event()

    async def call_task(task: str, event: dict[str, Any]) -> None:
        calls.append((task, event))
        if len(calls) >= 2:
            got.set()

    conn = open_db(tmp_path / "d.db")
    store = TimerStore(conn)
    core = TimerCore()
    timer = Timer("fast", "* * * * * *", "task", {"x": 1})  # every second
    core.add(timer, 0.0, next_run=None)
    core.next_run["fast"] = 0.0  # missed long ago; policy skip
    store.save(timer, 0.0)
    runner = TimerRunner(core, store, call_task, max_sleep_s=0.5)
    run = asyncio.create_task(runner.run())
    try:
        await asyncio.wait_for(got.wait(), 30)
    finally:
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)
    assert calls[0][0] == "task"
    assert calls[0][1]["payload"] == {"x": 1} and calls[0][1]["late"] is False
    assert core.skipped >= 1  # the run at t=0 was skipped by policy
    persisted = TimerCore()
    TimerStore(open_db(tmp_path / "d.db")).load(persisted, 0.0)
    assert persisted.next_run["fast"] > 1_000_000_000  # a real wall-clock time was saved

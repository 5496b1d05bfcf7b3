"""RangeGate: barriers wait for overlapping writes in flight and hold new ones back."""

from __future__ import annotations

import asyncio

import pytest

from edgevisor.storage.range_gate import RangeGate


async def test_barrier_waits_for_write_in_flight_and_blocks_new_ones() -> None:
    gate = RangeGate()
    t1 = await gate.enter(100, 200)
    entered = asyncio.Event()
    order: list[str] = []

    async def barrier() -> None:
        async with gate.barrier(150, 400, timeout_s=30):
            order.append("barrier")
            entered.set()
            await asyncio.sleep(0.05)
            order.append("barrier-end")

    async def late_write() -> None:
        await entered.wait()
        async with gate.writing(300, 310):
            order.append("late-write")

    b = asyncio.create_task(barrier())
    w = asyncio.create_task(late_write())
    # A write elsewhere passes at once while the barrier waits.
    assert gate.try_enter(0, 100) is not None
    await asyncio.sleep(0.05)
    assert order == []  # the barrier still waits for the write in flight
    gate.leave(t1)
    await asyncio.wait_for(asyncio.gather(b, w), 30)
    assert order == ["barrier", "barrier-end", "late-write"]
    assert gate.try_enter(150, 400) is not None


async def test_barrier_times_out_and_releases_writers() -> None:
    gate = RangeGate()
    gate.try_enter(0, 10)
    with pytest.raises(TimeoutError):
        async with gate.barrier(5, 6, timeout_s=0.05):
            pass
    assert gate.try_enter(5, 6) is not None  # the barrier is gone after the failure


async def test_leave_is_idempotent() -> None:
    gate = RangeGate()
    t = gate.try_enter(0, 10)
    assert t is not None
    gate.leave(t)
    gate.leave(t)
    assert gate.writes_in_flight == 0

"""RangeOrder (overlapping sync writes one after the other) and the fill's yield to
foreground I/O (lazy_fill's in-flight limit)."""

from __future__ import annotations

import asyncio
import math
import time
from types import SimpleNamespace
from typing import Any

from edgevisor.storage.lazy_fill import _inflight_limit
from edgevisor.storage.lazy_parts import LazySettings
from edgevisor.storage.range_gate import RangeOrder


async def test_overlapping_holders_run_one_at_a_time_others_at_once() -> None:
    order = RangeOrder()
    log: list[str] = []
    release = {k: asyncio.Event() for k in ("a", "b", "c", "d")}

    async def op(name: str, lo: int, hi: int) -> None:
        async with order.hold(lo, hi):
            log.append(f"{name}+")
            await release[name].wait()
            log.append(f"{name}-")

    a = asyncio.create_task(op("a", 0, 100))
    await asyncio.sleep(0)
    b = asyncio.create_task(op("b", 50, 150))  # overlaps a: waits
    c = asyncio.create_task(op("c", 200, 300))  # disjoint: runs at once
    await asyncio.sleep(0.02)
    assert log == ["a+", "c+"] and len(order) == 2
    d = asyncio.create_task(op("d", 120, 130))  # overlaps b (waiting), not a
    await asyncio.sleep(0.02)
    assert "d+" in log  # b has not started: nothing overlapping d holds yet
    release["a"].set()
    await asyncio.sleep(0.02)
    assert "b+" not in log  # b still waits for d, which entered while b was waiting
    release["d"].set()
    release["c"].set()
    await asyncio.sleep(0.02)
    assert log.index("a-") < log.index("b+") and log.index("d-") < log.index("b+")
    release["b"].set()
    await asyncio.wait_for(asyncio.gather(a, b, c, d), 30)
    assert len(order) == 0


async def test_a_cancelled_holder_lets_the_next_one_in() -> None:
    order = RangeOrder()
    gate = asyncio.Event()

    async def hold_forever() -> None:
        async with order.hold(0, 10):
            await gate.wait()

    first = asyncio.create_task(hold_forever())
    await asyncio.sleep(0)
    entered = asyncio.Event()

    async def second() -> None:
        async with order.hold(5, 6):
            entered.set()

    s = asyncio.create_task(second())
    await asyncio.sleep(0.02)
    assert not entered.is_set()
    first.cancel()
    await asyncio.wait_for(s, 30)
    assert entered.is_set() and len(order) == 0


def _vol(foreground: int, rate: float = math.inf, **kw: Any) -> Any:
    return SimpleNamespace(
        _foreground=foreground,
        settings=LazySettings(**kw),
        _fill_window=(time.monotonic(), 0),
        _fill_rate=rate,
        local=SimpleNamespace(present_blocks=0, block_size=65536),
    )


def test_fill_yields_to_foreground_io() -> None:
    assert _inflight_limit(_vol(0, fill_inflight=8)) == 8
    assert _inflight_limit(_vol(1, fill_inflight=8)) == 1  # default: one request
    assert _inflight_limit(_vol(2, fill_inflight=8, fill_yield_inflight=3)) == 3
    assert _inflight_limit(_vol(1, fill_inflight=2, fill_yield_inflight=3)) == 2
    assert _inflight_limit(_vol(1, fill_inflight=8, fill_yield_inflight=0)) == 8  # off


def test_fill_stops_yielding_below_its_floor() -> None:
    floor = {"fill_inflight": 8, "fill_yield_min_rate_bytes_per_s": 100_000_000}
    assert _inflight_limit(_vol(1, 200e6, **floor)) == 1
    assert _inflight_limit(_vol(1, 50e6, **floor)) == 8  # too slow already: no yield
    assert _inflight_limit(_vol(1, 0.0, fill_inflight=8, fill_yield_min_rate_bytes_per_s=0)) == 1


def test_fill_rate_is_measured_over_whole_windows() -> None:
    v = _vol(1, fill_inflight=8)
    v._fill_window = (time.monotonic() - 1.0, 0)
    v.local.present_blocks = 1000  # 1000 x 64 KiB in ~1 s: ~65 MB/s
    assert _inflight_limit(v) == 8  # below the default 100 MB/s floor
    assert 30e6 < v._fill_rate < 70e6
    assert v._fill_window[1] == 1000  # the next window starts here
    v.local.present_blocks = 1_000_000
    assert _inflight_limit(v) == 8  # the window is not over: the last rate holds

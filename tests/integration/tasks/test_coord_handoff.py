"""A queued sync call is run by its own caller when it leaves the queue (no task of its own):
every call still runs exactly once, in order per free environment, and a caller that goes
away after its call was dispatched does not leave the environment or the call hanging."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from coord_fakeenv import FakeFactory, make_bundle

from edgevisor.tasks.calls import CallRecord, CallState, new_call_id
from edgevisor.tasks.service import Coordinator, CoordinatorSettings

pytestmark = pytest.mark.timeout(60)


async def _until(cond: Callable[[], bool], timeout_s: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while not cond():
        if loop.time() > end:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


def _coord(tmp_path: Path, factory: FakeFactory, **kw: Any) -> Coordinator:
    opts: dict[str, Any] = {"memory_mb": 1000, "cpu": 4.0, "max_envs": 16}
    opts.update(kw)
    return Coordinator(factory, CoordinatorSettings(**opts), tmp_path / "data")


async def test_coord_handoff_many_queued_sync_calls_each_run_once(tmp_path: Path) -> None:
    ran: list[int] = []

    async def count(event: Any, ctx: Any) -> Any:
        ran.append(event)
        await asyncio.sleep(0)
        return event * 2

    factory = FakeFactory({"count": count})
    c = _coord(tmp_path, factory, max_envs=2)
    await c.start()
    try:
        await c.deploy(make_bundle(tmp_path, "count"))
        recs = await asyncio.gather(*(c.invoke("count", i) for i in range(300)))
        assert [r.status for r in recs] == ["succeeded"] * 300
        assert [r.result for r in recs] == [i * 2 for i in range(300)]
        assert sorted(ran) == list(range(300))
        assert factory.peak_envs <= 2
        assert c.stats() == {**c.stats(), "pending": 0, "in_flight": 0}
        # Every call got a final record in the journal too.
        await c.flush()
        for r in recs[:5]:
            assert (await c.get_call(r.id)).status == "succeeded"
    finally:
        await c.close()


async def test_coord_handoff_caller_cancelled_after_dispatch_call_still_runs(
    tmp_path: Path,
) -> None:
    gate = asyncio.Event()
    ran: list[str] = []

    async def held(event: Any, ctx: Any) -> Any:
        ran.append(event)
        if event == "first":
            await gate.wait()
        return event

    factory = FakeFactory({"held": held})
    c = _coord(tmp_path, factory, max_envs=1)
    second: list[asyncio.Task[Any]] = []
    dispatch = c._dispatch

    def dispatch_then_cancel(env_id: int, call_id: str, fresh: bool) -> None:
        # The race under test: the caller's call was handed to it, and the caller is
        # cancelled before it resumes to run it.
        dispatch(env_id, call_id, fresh)
        if c._calls[call_id].event == "second":
            second[0].cancel()

    c._dispatch = dispatch_then_cancel  # type: ignore[method-assign]
    await c.start()
    try:
        await c.deploy(make_bundle(tmp_path, "held"))
        first = asyncio.create_task(c.invoke("held", "first"))
        await _until(lambda: ran == ["first"])
        second.append(asyncio.create_task(c.invoke("held", "second")))
        await _until(lambda: c.stats()["pending"] == 1)
        gate.set()
        assert (await first).status == "succeeded"
        with pytest.raises(asyncio.CancelledError):
            await second[0]
        # dispatched already: it runs without its caller, and frees the environment
        await _until(lambda: ran == ["first", "second"])
        await _until(lambda: c.stats()["in_flight"] == 0 and c.stats()["pending"] == 0)
        assert (await c.invoke("held", "third")).result == "third"
    finally:
        await c.close()


async def test_coord_handoff_queued_caller_gets_record_when_task_removed(
    tmp_path: Path,
) -> None:
    gate = asyncio.Event()

    async def held(event: Any, ctx: Any) -> Any:
        await gate.wait()
        return event

    factory = FakeFactory({"held": held})
    c = _coord(tmp_path, factory, max_envs=1)
    await c.start()
    try:
        await c.deploy(make_bundle(tmp_path, "held"))
        first = asyncio.create_task(c.invoke("held", 1))
        await _until(lambda: c.stats()["in_flight"] == 1)
        queued = asyncio.create_task(c.invoke("held", 2))
        await _until(lambda: c.stats()["pending"] == 1)
        await c.remove("held")
        rec = await asyncio.wait_for(queued, 10)
        assert rec.status == "failed" and rec.error is not None
        assert rec.error["type"] == "TaskRemoved"
        gate.set()
        assert (await first).status == "succeeded"
    finally:
        await c.close()


def test_coord_record_is_what_model_construct_makes() -> None:
    s = CallState(
        new_call_id(), "t", "v1", "v1", {"a": [1, 2]}, async_=True, idempotency_key="k",
        priority=3, created_at=1.5, enqueued_mono=2.0,
    )  # fmt: skip
    s.status, s.result, s.logs, s.run_s, s.finished_at = "succeeded", {"r": 1}, "out", 0.1, 9.0
    fields = {name: getattr(s, name) for name in CallRecord.model_fields}
    expected = CallRecord.model_construct(**fields)
    got = s.record()
    assert got == expected
    assert got.model_dump() == expected.model_dump()
    assert got.model_fields_set == expected.model_fields_set
    assert got.model_dump_json() == expected.model_dump_json()
    # model_copy(update=...) adds to the fields-set: each record has its own.
    assert got.model_copy(update={"status": "failed"}).status == "failed"
    assert s.record().model_fields_set == expected.model_fields_set


def test_coord_call_ids_sort_by_time() -> None:
    ids = []
    for _ in range(3):
        ids.append(new_call_id())
        ids.append(new_call_id())
        time.sleep(0.002)  # the millisecond prefix must grow
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    assert len(set(ids)) == len(ids)
    assert [i[:12] for i in ids] == sorted(i[:12] for i in ids)
    assert ids[0][:12] < ids[-1][:12]

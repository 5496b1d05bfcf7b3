"""The Coordinator end to end, with the in-process stand-in environment (coord_fakeenv)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from coord_fakeenv import OOM, Crash, FakeFactory, make_bundle

from edgevisor.errors import NotFound, PayloadTooLarge, RequestError, TooManyRequests
from edgevisor.tasks.calls import CallRecord
from edgevisor.tasks.service import Coordinator, CoordinatorSettings
from edgevisor.tasks.spec import SpecError

pytestmark = pytest.mark.timeout(60)


async def _until(cond: Callable[[], bool], timeout_s: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while not cond():
        if loop.time() > end:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


@pytest.fixture
def factory() -> FakeFactory:
    async def echo(event: Any, ctx: Any) -> Any:
        return {"echo": event}

    return FakeFactory({"echo": echo})


@pytest.fixture
def make_coord(tmp_path: Path, factory: FakeFactory) -> Callable[..., Coordinator]:
    def make(**kw: Any) -> Coordinator:
        opts: dict[str, Any] = {"memory_mb": 1000, "cpu": 4.0, "max_envs": 16}
        opts.update(kw)
        return Coordinator(factory, CoordinatorSettings(**opts), tmp_path / "data")

    return make


@pytest.fixture
async def coord(make_coord: Callable[..., Coordinator]) -> AsyncIterator[Coordinator]:
    c = make_coord()
    await c.start()
    try:
        yield c
    finally:
        await c.close()


async def test_deploy_invoke_cold_then_warm(
    coord: Coordinator, factory: FakeFactory, tmp_path: Path
) -> None:
    factory.start_delay_s = 0.02
    tv = await coord.deploy(make_bundle(tmp_path, "echo", memory="64M"))
    assert tv.name == "echo" and tv.spec.memory_mb == 64
    assert [t.name for t in coord.list()] == ["echo"]
    assert coord.show("echo") == tv
    starts_after_deploy = factory.starts  # deploy loaded it once to validate
    cold = await coord.invoke("echo", {"n": 1})
    assert isinstance(cold, CallRecord)
    assert cold.status == "succeeded" and cold.result == {"echo": {"n": 1}}
    assert cold.init_s is not None and cold.init_s >= 0.02
    assert cold.queue_wait_s is not None and cold.queue_wait_s >= 0
    assert cold.run_s is not None and cold.started_at and cold.finished_at
    warm = await coord.invoke("echo", {"n": 2})
    assert warm.status == "succeeded" and warm.init_s == 0.0
    assert factory.starts == starts_after_deploy + 1  # the warm call reused the environment
    assert (await coord.get_call(cold.id)).result == {"echo": {"n": 1}}


async def test_async_call_is_journaled_and_survives_restart(
    make_coord: Callable[..., Coordinator], factory: FakeFactory, tmp_path: Path
) -> None:
    gate = asyncio.Event()

    async def slow(event: Any, ctx: Any) -> Any:
        await gate.wait()
        return event["i"] * 2

    factory.handlers["slow"] = slow
    a = make_coord(max_envs=2)
    await a.start()
    await a.deploy(make_bundle(tmp_path, "slow", concurrency=2))
    ids = [await a.invoke("slow", {"i": i}, async_=True) for i in range(6)]
    assert (await a.get_call(ids[0])).status in ("queued", "running")
    await a.close()  # nothing finished: every call is still open in the journal
    gate.set()
    b = make_coord(max_envs=2)
    await b.start()
    try:
        assert [t.name for t in b.list()] == ["slow"]  # deployed tasks are reloaded too
        recs = [await b.wait_call(i, 20) for i in ids]
        assert [r.status for r in recs] == ["succeeded"] * 6
        assert [r.result for r in recs] == [i * 2 for i in range(6)]
    finally:
        await b.close()
    c = make_coord()
    await c.start()
    try:
        assert (await c.get_call(ids[3])).result == 6  # read back from the journal
    finally:
        await c.close()


async def test_idempotency_key_same_call_runs_once(
    coord: Coordinator, factory: FakeFactory, tmp_path: Path
) -> None:
    runs: list[Any] = []

    async def count(event: Any, ctx: Any) -> Any:
        runs.append(event)
        await asyncio.sleep(0.01)
        return len(runs)

    factory.handlers["count"] = count
    await coord.deploy(make_bundle(tmp_path, "count"))
    ids = await asyncio.gather(
        *(coord.invoke("count", {}, async_=True, idempotency_key="k1") for _ in range(5))
    )
    assert len(set(ids)) == 1
    rec = await coord.wait_call(ids[0], 10)
    assert await coord.invoke("count", {}, async_=True, idempotency_key="k1") == ids[0]
    sync = await coord.invoke("count", {}, idempotency_key="k1")
    assert sync.id == rec.id and sync.result == rec.result
    assert len(runs) == 1
    other = await coord.invoke("count", {}, idempotency_key="k2")
    assert other.id != rec.id and len(runs) == 2


async def test_bad_payloads(make_coord: Callable[..., Coordinator], tmp_path: Path) -> None:
    c = make_coord(payload_limit_bytes=100)
    await c.start()
    try:
        await c.deploy(make_bundle(tmp_path, "echo"))
        with pytest.raises(PayloadTooLarge) as info:
            await c.invoke("echo", {"x": "y" * 200})
        assert info.value.status == 413
        with pytest.raises(RequestError, match="not JSON"):
            await c.invoke("echo", {"x": object()})
        with pytest.raises(NotFound):
            await c.invoke("nope", {})
        assert (await c.invoke("echo", {"x": "small"})).status == "succeeded"
    finally:
        await c.close()


async def test_big_call_waits_small_calls_pass_then_it_runs(
    coord: Coordinator, factory: FakeFactory, tmp_path: Path
) -> None:
    """Host budget 1000 MB fits one 800 MB call; 100 MB calls run while it waits."""
    gates: dict[int, asyncio.Event] = {}
    order: list[str] = []

    async def small(event: Any, ctx: Any) -> Any:
        order.append(f"small{event['i']}")
        gates.setdefault(event["i"], asyncio.Event())
        await gates[event["i"]].wait()
        return event["i"]

    async def big(event: Any, ctx: Any) -> Any:
        order.append("big")
        return "big done"

    factory.handlers.update(small=small, big=big)
    await coord.deploy(make_bundle(tmp_path, "small", memory="100M", concurrency=10))
    await coord.deploy(make_bundle(tmp_path, "big", memory="800M", concurrency=1))
    first = [await coord.invoke("small", {"i": i}, async_=True) for i in range(3)]
    await _until(lambda: len(order) == 3)
    big_id = await coord.invoke("big", {}, async_=True)
    later = [await coord.invoke("small", {"i": i}, async_=True) for i in range(3, 5)]
    await _until(lambda: len(order) == 5)  # the small calls passed the big one
    assert "big" not in order
    assert (await coord.get_call(big_id)).status == "queued"
    for i in range(5):
        gates[i].set()
    rec = await coord.wait_call(big_id, 20)
    assert rec.status == "succeeded" and rec.result == "big done"
    assert rec.queue_wait_s is not None and rec.queue_wait_s > 0
    for cid in first + later:
        assert (await coord.wait_call(cid, 20)).status == "succeeded"
    assert factory.peak_memory_mb <= 1000  # warm small envs were evicted for the big one
    assert order.index("big") == 5


async def test_handler_errors_and_dead_environments(
    coord: Coordinator, factory: FakeFactory, tmp_path: Path
) -> None:
    async def faulty(event: Any, ctx: Any) -> Any:
        kind = event["kind"]
        if kind == "raise":
            raise ValueError("bad input")
        if kind == "crash":
            raise Crash("killed by SIGSEGV")
        if kind == "oom":
            raise OOM()
        if kind == "hang":
            await asyncio.sleep(30)
        if kind == "unjson":
            return {1, 2}
        return "ok"

    factory.handlers["faulty"] = faulty
    factory.logs_per_call = "x" * 5000
    await coord.deploy(make_bundle(tmp_path, "faulty", timeout="200ms"))
    created = len(factory.created)
    r = await coord.invoke("faulty", {"kind": "raise"})
    assert r.status == "failed" and r.error is not None
    assert r.error["type"] == "ValueError" and r.error["message"] == "bad input"
    assert "Traceback" in r.error["traceback"]
    r = await coord.invoke("faulty", {"kind": "ok"})
    assert r.status == "succeeded"
    assert len(factory.created) == created + 1  # still healthy after a raise: reused
    r = await coord.invoke("faulty", {"kind": "hang"})
    assert r.status == "timeout"
    r = await coord.invoke("faulty", {"kind": "crash"})
    assert r.status == "crashed" and r.error == {"type": "Crashed", "message": "killed by SIGSEGV"}
    r = await coord.invoke("faulty", {"kind": "oom"})
    assert r.status == "oom" and r.error is not None and r.error["limit_mb"] == 128
    r = await coord.invoke("faulty", {"kind": "unjson"})
    assert r.status == "failed" and r.error is not None
    assert r.error["type"] == "ResultNotSerializable"
    assert len(factory.created) == created + 4  # a new env after each dead one
    await _until(lambda: all(not e.healthy for e in factory.created[: created + 3]))
    r = await coord.invoke("faulty", {"kind": "ok"})
    assert r.status == "succeeded"


async def test_logs_are_capped(
    make_coord: Callable[..., Coordinator], factory: FakeFactory, tmp_path: Path
) -> None:
    factory.logs_per_call = "é" * 10_000
    c = make_coord(log_cap_bytes=1000)
    await c.start()
    try:
        await c.deploy(make_bundle(tmp_path, "echo"))
        r = await c.invoke("echo", 1)
        assert len(r.logs.encode()) <= 1000 + 20 and r.logs.endswith("[logs truncated]")
    finally:
        await c.close()


async def test_task_to_task_call(coord: Coordinator, factory: FakeFactory, tmp_path: Path) -> None:
    async def parent(event: Any, ctx: Any) -> Any:
        child = await ctx.invoke("echo", {"from": "parent"})
        later = await ctx.invoke("echo", {"async": True}, async_=True)
        return {"child": child, "async_id": later}

    factory.handlers["parent"] = parent
    await coord.deploy(make_bundle(tmp_path, "echo"))
    await coord.deploy(make_bundle(tmp_path, "parent"))
    r = await coord.invoke("parent", None)
    assert r.status == "succeeded"
    assert r.result["child"] == {"echo": {"from": "parent"}}
    sub = await coord.wait_call(r.result["async_id"], 10)
    assert sub.status == "succeeded" and sub.task == "echo"


async def test_redeploy_leaves_calls_in_flight_on_old_version(
    coord: Coordinator, factory: FakeFactory, tmp_path: Path
) -> None:
    gate = asyncio.Event()

    async def v(event: Any, ctx: Any) -> Any:
        if event == "wait":
            await gate.wait()
        return "done"

    factory.handlers["v"] = v
    v1 = await coord.deploy(make_bundle(tmp_path, "v", memory="64M"))
    inflight = await coord.invoke("v", "wait", async_=True)
    await _until(lambda: factory.running == 1)
    v2 = await coord.deploy(make_bundle(tmp_path, "v", memory="96M"))
    assert v2.version != v1.version and coord.show("v").version == v2.version
    r2 = await coord.invoke("v", "now")
    assert r2.version == v2.version
    gate.set()
    r1 = await coord.wait_call(inflight, 10)
    assert r1.status == "succeeded" and r1.version == v1.version
    old_envs = [e for e in factory.created if e.spec.memory_mb == 64 and e.calls]
    await _until(lambda: all(not e.healthy for e in old_envs))  # retired after its call


async def test_remove_fails_queued_calls(
    make_coord: Callable[..., Coordinator], factory: FakeFactory, tmp_path: Path
) -> None:
    gate = asyncio.Event()

    async def held(event: Any, ctx: Any) -> Any:
        await gate.wait()
        return 1

    factory.handlers["held"] = held
    c = make_coord(max_envs=1)
    await c.start()
    try:
        await c.deploy(make_bundle(tmp_path, "held"))
        running = await c.invoke("held", 1, async_=True)
        queued = await c.invoke("held", 2, async_=True)
        await _until(lambda: factory.running == 1)
        await c.remove("held")
        r = await c.wait_call(queued, 5)
        assert r.status == "failed" and r.error is not None and r.error["type"] == "TaskRemoved"
        gate.set()
        assert (await c.wait_call(running, 5)).status == "succeeded"
        with pytest.raises(NotFound):
            await c.invoke("held", 3)
        with pytest.raises(NotFound):
            c.show("held")
    finally:
        await c.close()


async def test_deploy_rejections(coord: Coordinator, factory: FakeFactory, tmp_path: Path) -> None:
    factory.fail_start.add("broken")
    with pytest.raises(SpecError) as info:
        await coord.deploy(make_bundle(tmp_path, "broken"))
    assert info.value.field == "handler" and "cannot import" in info.value.reason
    with pytest.raises(SpecError) as info:
        await coord.deploy(make_bundle(tmp_path, "huge", memory="2G"))
    assert info.value.field == "memory" and "host budget" in info.value.reason
    assert coord.list() == []
    assert not factory.live  # the validation environment was closed


async def test_queue_bound_answers_429(
    make_coord: Callable[..., Coordinator], factory: FakeFactory, tmp_path: Path
) -> None:
    gate = asyncio.Event()

    async def held(event: Any, ctx: Any) -> Any:
        await gate.wait()
        return 1

    factory.handlers["held"] = held
    c = make_coord(max_envs=1, queue_bound=3, retry_after_s=7.0)
    await c.start()
    try:
        await c.deploy(make_bundle(tmp_path, "held"))
        ids = [await c.invoke("held", i, async_=True) for i in range(4)]  # 1 running + 3 queued
        await _until(lambda: factory.running == 1)
        with pytest.raises(TooManyRequests) as info:
            await c.invoke("held", 9, async_=True)
        assert info.value.retry_after_s == 7.0
        with pytest.raises(TooManyRequests):
            await c.invoke("held", 9)
        gate.set()
        for i in ids:
            assert (await c.wait_call(i, 10)).status == "succeeded"
    finally:
        await c.close()


async def test_keep_warm_expiry_and_prewarm(
    coord: Coordinator, factory: FakeFactory, tmp_path: Path
) -> None:
    await coord.deploy(make_bundle(tmp_path, "echo", keep_warm={"idle": "200ms"}))
    await coord.invoke("echo", 1)
    assert coord.stats()["envs"] == 1
    await _until(lambda: coord.stats()["envs"] == 0, 10)  # closed after its idle time

    async def pw(event: Any, ctx: Any) -> Any:
        return "pw"

    factory.handlers["pw"] = pw
    await coord.deploy(make_bundle(tmp_path, "pw", keep_warm={"idle": "1m", "prewarm": 1}))
    await _until(lambda: any(e.spec.task == "pw" and e.healthy for e in factory.created), 10)
    r = await coord.invoke("pw", None)
    assert r.status == "succeeded" and r.init_s == 0.0  # served by the prewarmed env


async def test_cancelled_sync_caller_does_not_run_later(
    make_coord: Callable[..., Coordinator], factory: FakeFactory, tmp_path: Path
) -> None:
    gate = asyncio.Event()
    ran: list[Any] = []

    async def held(event: Any, ctx: Any) -> Any:
        ran.append(event)
        await gate.wait()
        return event

    factory.handlers["held"] = held
    c = make_coord(max_envs=1)
    await c.start()
    try:
        await c.deploy(make_bundle(tmp_path, "held"))
        first = await c.invoke("held", "first", async_=True)
        await _until(lambda: ran == ["first"])
        waiting = asyncio.create_task(c.invoke("held", "abandoned"))
        await _until(lambda: c.stats()["pending"] == 1)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert c.stats()["pending"] == 0
        gate.set()
        assert (await c.wait_call(first, 10)).status == "succeeded"
        assert (await c.invoke("held", "next")).status == "succeeded"
        assert ran == ["first", "next"]
    finally:
        await c.close()

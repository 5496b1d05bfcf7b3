"""The per-environment call timer (one armed handle, not a timer per call): a call past its
deadline is a timeout also after many quick calls and after idle time; an outside
cancellation stays a cancellation."""

from __future__ import annotations

import asyncio
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from edgevisor.tasks.environment import EnvSpec
from edgevisor.tasks.sandbox import PlainEnvironment, PlainFactory, SandboxSettings, _CallTimer

pytestmark = pytest.mark.timeout(60)


async def _guarded(timer: _CallTimer, timeout_s: float, work_s: float) -> str:
    task = asyncio.current_task()
    assert task is not None
    timer.start(task, timeout_s)
    try:
        await asyncio.sleep(work_s)
    except asyncio.CancelledError:
        if timer.fired and task.uncancel() == 0:
            return "timeout"
        raise
    finally:
        timer.stop()
    return "done"


async def test_sandbox_calltimer_fires_only_past_the_deadline_of_the_call_in_progress() -> None:
    timer = _CallTimer()
    try:
        # Quick calls leave the one handle armed at the first deadline ...
        for _ in range(50):
            assert await _guarded(timer, 0.3, 0) == "done"
        # ... a later call that runs past the first deadline but not its own is not hit:
        # the handle fires, sees the later deadline and re-arms.
        await asyncio.sleep(0.2)
        assert await _guarded(timer, 0.3, 0.2) == "done"
        # A call past its own deadline is.
        assert await _guarded(timer, 0.1, 5) == "timeout"
        # After idle time (the handle disarmed) the next slow call is hit too.
        await asyncio.sleep(0.4)
        assert await _guarded(timer, 0.1, 5) == "timeout"
        assert await _guarded(timer, 5, 0) == "done"
    finally:
        timer.close()


async def test_sandbox_calltimer_shorter_timeout_after_longer_one_fires_on_time() -> None:
    timer = _CallTimer()
    try:
        assert await _guarded(timer, 30, 0) == "done"  # handle armed 30 s out
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        assert await _guarded(timer, 0.2, 10) == "timeout"
        assert loop.time() - t0 < 8  # re-armed for the earlier deadline, not 30 s
    finally:
        timer.close()


HANDLERS = textwrap.dedent(
    """
    import time
    def echo(event, context):
        return event
    def nap(event, context):
        time.sleep(event)
        return "woke"
    """
)


@pytest.fixture
def factory() -> Iterator[PlainFactory]:
    f = PlainFactory(SandboxSettings())
    try:
        yield f
    finally:
        f.close()


@pytest.fixture
async def env(tmp_path: Path, factory: PlainFactory) -> AsyncIterator[PlainEnvironment]:
    (tmp_path / "handlers.py").write_text(HANDLERS)
    spec = EnvSpec(
        task="t1", version="v1", bundle_dir=tmp_path, runtime="python", handler="handlers:nap",
        memory_mb=256, cpu=1.0, timeout_s=0.5,
    )  # fmt: skip
    e = factory.create(spec)
    assert isinstance(e, PlainEnvironment)
    await e.start()
    try:
        yield e
    finally:
        await e.close()


async def test_sandbox_calltimer_warm_env_times_out_after_many_quick_calls(
    env: PlainEnvironment,
) -> None:
    for _ in range(30):
        out = await env.invoke(0, {})
        assert out.status == "ok" and out.result == "woke"
    await asyncio.sleep(0.6)  # past the first call's deadline: the handle fired idle
    assert (await env.invoke(0, {})).status == "ok"
    out = await env.invoke(30, {})
    assert out.status == "timeout"
    assert out.error is not None and out.error["timeout_s"] == 0.5
    assert not env.healthy


async def test_sandbox_calltimer_outside_cancel_is_not_a_timeout(env: PlainEnvironment) -> None:
    call: asyncio.Task[Any] = asyncio.create_task(env.invoke(30, {}))
    await asyncio.sleep(0.1)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    # and the timer does not fire into some later task
    await asyncio.sleep(0.7)

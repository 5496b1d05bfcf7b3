"""PlainFactory: the runtime as a plain subprocess with rlimits (what non-root users get)."""

from __future__ import annotations

import asyncio
import os
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from edgevisor.tasks.environment import Environment, EnvSpec
from edgevisor.tasks.sandbox import (
    HandlerLoadError,
    PlainFactory,
    SandboxSettings,
    plain_isolation_warning,
)

HANDLERS = textwrap.dedent(
    """
    import os, signal, sys, time

    LOADS = []
    LOADS.append(os.getpid())

    def echo(event, context):
        return {"event": event, "pid": os.getpid(), "loads": len(LOADS),
                "call_id": context.call_id, "task": context.task,
                "remaining": context.remaining_s(), "env": os.environ.get("GREETING")}

    def noisy(event, context):
        print("to stdout")
        sys.stderr.write("to stderr\\n")
        os.write(1, b"raw fd write\\n")
        return "done"

    def flood(event, context):
        sys.stdout.write("x" * 100000)
        return len("x" * 100000)

    def boom(event, context):
        raise KeyError("missing thing")

    def not_json(event, context):
        return object()

    def segv(event, context):
        os.kill(os.getpid(), signal.SIGSEGV)

    def eat(event, context):
        hog = []
        while True:
            hog.append(bytearray(8 << 20))

    def nap(event, context):
        time.sleep(event)
        return "woke"

    def leave_a_thread(event, context):
        import threading
        def chatter():
            time.sleep(0.2)
            for fd in range(3, 32):
                try:
                    os.write(fd, b"unsolicited")
                except OSError:
                    pass
        threading.Thread(target=chatter, daemon=True).start()
        return "returned"

    def calls_other(event, context):
        first = context.invoke("other", {"n": 1})
        queued = context.invoke("other", {"n": 2}, async_=True)
        try:
            context.invoke("broken", None)
        except Exception as exc:
            err = [type(exc).__name__, exc.type, str(exc)]
        return {"first": first, "queued": queued, "err": err}
    """
)


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    d = tmp_path / "bundle"
    d.mkdir()
    (d / "handlers.py").write_text(HANDLERS)
    (d / "broken.py").write_text("raise RuntimeError('import time failure')\n")
    cmd = d / "cmd.sh"
    cmd.write_text(
        "#!/bin/sh\nread line\necho \"log line\" >&2\n"
        "printf '{\"got\": %s, \"call\": \"%s\"}' \"$line\" \"$EDGEVISOR_CALL_ID\"\n"
    )
    cmd.chmod(0o755)
    bad = d / "bad.sh"
    bad.write_text("#!/bin/sh\necho oops\nexit 3\n")
    bad.chmod(0o755)
    return d


@pytest.fixture
def factory() -> Iterator[PlainFactory]:
    f = PlainFactory(SandboxSettings(log_cap_bytes=1000))
    try:
        yield f
    finally:
        f.close()


def spec(bundle: Path, handler: str, **kw: Any) -> EnvSpec:
    base: dict[str, Any] = dict(
        task="t1", version="v1", bundle_dir=bundle, runtime="python", handler=handler,
        memory_mb=256, cpu=1.0, timeout_s=20.0,
    )
    base.update(kw)
    return EnvSpec(**base)


@pytest.fixture
async def envs() -> AsyncIterator[list[Environment]]:
    made: list[Environment] = []
    try:
        yield made
    finally:
        for env in made:
            await env.close()


async def started(factory: PlainFactory, envs: list[Environment], s: EnvSpec) -> Environment:
    env = factory.create(s)
    envs.append(env)
    await env.start()
    return env


def test_factory_is_not_isolated_and_warning_names_what_is_missing() -> None:
    assert PlainFactory.isolated is False
    text = plain_isolation_warning()
    for word in ("namespaces", "cgroups", "RLIMIT_DATA", "root"):
        assert word in text


async def test_warm_calls_reuse_the_process_and_load_the_handler_once(
    factory: PlainFactory, envs: list[Environment], bundle: Path
) -> None:
    env = await started(factory, envs, spec(bundle, "handlers:echo", env={"GREETING": "hi"}))
    first = await env.invoke({"a": 1}, {"call_id": "call-1"})
    second = await env.invoke([1, 2], {})
    assert first.status == "ok" and second.status == "ok"
    assert first.result["event"] == {"a": 1}
    assert first.result["call_id"] == "call-1"
    assert first.result["task"] == "t1"
    assert first.result["env"] == "hi"
    assert 0 < first.result["remaining"] <= 20.0
    assert first.result["pid"] == second.result["pid"]
    assert second.result["loads"] == 1
    assert first.init_s > 0 and second.init_s == 0.0
    assert env.healthy


async def test_output_of_the_call_is_captured_in_order_and_capped(
    factory: PlainFactory, envs: list[Environment], bundle: Path
) -> None:
    env = await started(factory, envs, spec(bundle, "handlers:noisy"))
    out = await env.invoke(None, {})
    assert out.status == "ok"
    assert out.logs == "to stdout\nto stderr\nraw fd write\n"
    again = await env.invoke(None, {})
    assert again.logs == out.logs  # emptied between calls
    env2 = await started(factory, envs, spec(bundle, "handlers:flood"))
    flood = await env2.invoke(None, {})
    assert flood.status == "ok" and flood.result == 100000
    assert flood.logs.startswith("x" * 1000)
    assert "output truncated: 100000 bytes, cap 1000" in flood.logs
    assert len(flood.logs) < 1200


async def test_exception_reports_type_message_traceback_and_stays_warm(
    factory: PlainFactory, envs: list[Environment], bundle: Path
) -> None:
    env = await started(factory, envs, spec(bundle, "handlers:boom"))
    out = await env.invoke(None, {})
    assert out.status == "error"
    assert out.error is not None
    assert out.error["type"] == "KeyError"
    assert "missing thing" in out.error["message"]
    assert 'handlers.py", line' in out.error["traceback"]
    assert env.healthy
    assert (await env.invoke(None, {})).status == "error"


async def test_result_that_is_not_json_is_a_clear_error(
    factory: PlainFactory, envs: list[Environment], bundle: Path
) -> None:
    env = await started(factory, envs, spec(bundle, "handlers:not_json"))
    out = await env.invoke(None, {})
    assert out.status == "error"
    assert out.error is not None and out.error["type"] == "ResultError"
    assert "not JSON" in out.error["message"]
    assert env.healthy


async def test_event_that_is_not_json_is_refused_without_harm(
    factory: PlainFactory, envs: list[Environment], bundle: Path
) -> None:
    env = await started(factory, envs, spec(bundle, "handlers:echo"))
    out = await env.invoke({1, 2}, {})
    assert out.status == "error" and out.error is not None
    assert out.error["type"] == "InvalidEvent"
    assert (await env.invoke(3, {})).result["event"] == 3


@pytest.mark.parametrize(
    ("handler", "needle"),
    [
        ("broken:handler", "import time failure"),
        ("handlers:absent", "absent"),
        ("nosuchmodule:f", "nosuchmodule"),
        ("no_colon", "module:function"),
    ],
)
async def test_handler_that_fails_to_load_is_rejected_with_the_reason(
    factory: PlainFactory, bundle: Path, handler: str, needle: str
) -> None:
    env = factory.create(spec(bundle, handler))
    with pytest.raises(HandlerLoadError, match=needle) as info:
        await env.start()
    assert info.value.details.get("traceback") or info.value.details.get("message")
    assert not env.healthy
    await env.close()


async def test_crash_reports_the_signal(
    factory: PlainFactory, envs: list[Environment], bundle: Path
) -> None:
    env = await started(factory, envs, spec(bundle, "handlers:segv"))
    out = await env.invoke(None, {})
    assert out.status == "crashed"
    assert out.error is not None and out.error["signal"] == "SIGSEGV"
    assert not env.healthy
    again = await env.invoke(None, {})
    assert again.status == "crashed"


async def test_memory_bomb_hits_rlimit_and_reports_the_limit(
    factory: PlainFactory, envs: list[Environment], bundle: Path
) -> None:
    env = await started(factory, envs, spec(bundle, "handlers:eat", memory_mb=96))
    out = await env.invoke(None, {})
    assert out.status == "oom"
    assert out.error is not None
    assert out.error["limit_mb"] == 96
    assert "memory limit exceeded (96 MB)" in out.error["message"]
    assert not env.healthy


async def test_timeout_kills_the_process_and_is_reported(
    factory: PlainFactory, envs: list[Environment], bundle: Path
) -> None:
    env = await started(factory, envs, spec(bundle, "handlers:nap", timeout_s=0.5))
    assert isinstance(env.pid, int)  # type: ignore[attr-defined]
    pid = env.pid  # type: ignore[attr-defined]
    out = await env.invoke(30, {})
    assert out.status == "timeout"
    assert out.error is not None and out.error["timeout_s"] == 0.5
    assert not env.healthy
    await env.close()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


async def test_subcalls_go_through_the_callback(
    factory: PlainFactory, envs: list[Environment], bundle: Path
) -> None:
    seen: list[tuple[str, Any, bool]] = []

    async def subcall(task: str, event: Any, async_: bool) -> Any:
        seen.append((task, event, async_))
        if task == "broken":
            raise LookupError("no such task")
        await asyncio.sleep(0)
        return "call-77" if async_ else {"answer": event["n"] * 10}

    env = await started(factory, envs, spec(bundle, "handlers:calls_other"))
    out = await env.invoke(None, {}, subcall)
    assert out.status == "ok", out.error
    assert out.result == {
        "first": {"answer": 10},
        "queued": "call-77",
        "err": ["SubcallError", "LookupError", "LookupError: no such task"],
    }
    assert seen == [("other", {"n": 1}, False), ("other", {"n": 2}, True), ("broken", None, False)]


async def test_command_runtime_runs_the_executable_per_call(
    factory: PlainFactory, envs: list[Environment], bundle: Path
) -> None:
    env = await started(factory, envs, spec(bundle, "cmd.sh", runtime="command"))
    out = await env.invoke({"k": [1]}, {"call_id": "c-5"})
    assert out.status == "ok", out.error
    assert out.result == {"got": {"k": [1]}, "call": "c-5"}
    assert out.logs == "log line\n"
    bad = await started(factory, envs, spec(bundle, "bad.sh", runtime="command"))
    failed = await bad.invoke(None, {})
    assert failed.status == "error" and failed.error is not None
    assert "status 3" in failed.error["message"]
    assert bad.healthy


async def test_command_that_is_not_executable_is_rejected(
    factory: PlainFactory, bundle: Path
) -> None:
    env = factory.create(spec(bundle, "handlers.py", runtime="command"))
    with pytest.raises(HandlerLoadError, match="not an executable"):
        await env.start()
    await env.close()


async def test_close_is_idempotent_and_kills_the_process(
    factory: PlainFactory, bundle: Path
) -> None:
    env = factory.create(spec(bundle, "handlers:echo"))
    await env.start()
    pid = env.pid  # type: ignore[attr-defined]
    await env.close()
    await env.close()
    assert not env.healthy
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


async def test_protocol_chatter_between_calls_retires_the_environment(
    factory: PlainFactory, envs: list[Environment], bundle: Path
) -> None:
    env = await started(factory, envs, spec(bundle, "handlers:leave_a_thread"))
    assert (await env.invoke(None, {})).status == "ok"
    deadline = asyncio.get_running_loop().time() + 20
    while env.healthy:
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.02)
    out = await env.invoke(None, {})
    assert out.status == "crashed"
    assert out.error is not None and out.error["type"] == "EnvironmentUnusable"

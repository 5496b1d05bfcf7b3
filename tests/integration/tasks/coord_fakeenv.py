"""An in-process stand-in for the execution environment, for the coordinator's tests.

It stands in only while the real environment (``tasks.sandbox``) is being written; the
coordinator is tested against the contract in ``tasks.environment``. A handler is a python
function ``handler(event, ctx)`` (sync or async) looked up by task name. Raising
:class:`Crash` or :class:`OOM` simulates a dead environment; any other exception is a
handler error and leaves the environment healthy. The factory records what happened so
tests can check budgets (memory of live environments, one call per environment).
"""

from __future__ import annotations

import asyncio
import inspect
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgevisor.tasks.environment import EnvSpec, Outcome, SubcallFn

Handler = Callable[[Any, "FakeContext"], Any]


class Crash(Exception):
    """Raised by a handler: the environment dies (status crashed)."""


class OOM(Exception):
    """Raised by a handler: the environment is OOM-killed (status oom)."""


class FailStart(Exception):
    """Raised from start(): the bundle does not load."""


class FakeContext:
    def __init__(self, context: dict[str, Any], subcall: SubcallFn | None) -> None:
        self.call_id = context.get("call_id")
        self.task = context.get("task")
        self._subcall = subcall

    async def invoke(self, task: str, event: Any, async_: bool = False) -> Any:
        assert self._subcall is not None
        return await self._subcall(task, event, async_)


class FakeEnv:
    def __init__(self, factory: FakeFactory, spec: EnvSpec) -> None:
        self.factory = factory
        self.spec = spec
        self._healthy = False
        self._busy = False
        self._closed = False
        self.calls = 0

    @property
    def healthy(self) -> bool:
        return self._healthy and not self._closed

    async def start(self) -> float:
        t0 = time.perf_counter()
        f = self.factory
        f.starts += 1
        f.live.add(self)
        f.peak_memory_mb = max(f.peak_memory_mb, f.live_memory_mb())
        f.peak_envs = max(f.peak_envs, len(f.live))
        if self.spec.task in f.fail_start:
            raise FailStart(f"cannot import {self.spec.handler}")
        if f.start_delay_s:
            await asyncio.sleep(f.start_delay_s)
        self._healthy = True
        return time.perf_counter() - t0

    async def invoke(
        self, event: Any, context: dict[str, Any], subcall: SubcallFn | None = None
    ) -> Outcome:
        assert not self._busy, "an environment serves one call at a time"
        assert self.healthy, "invoke on an unhealthy or closed environment"
        self._busy = True
        self.calls += 1
        f = self.factory
        f.running += 1
        f.peak_running = max(f.peak_running, f.running)
        f.log.append(("start", self.spec.task, context.get("call_id")))
        t0 = time.perf_counter()
        try:
            handler = f.handlers[self.spec.task]
            ctx = FakeContext(context, subcall)
            try:
                res = handler(event, ctx)
                if inspect.isawaitable(res):
                    res = await asyncio.wait_for(res, self.spec.timeout_s)
            except TimeoutError:
                self._healthy = False
                return Outcome(
                    "timeout",
                    error={"type": "Timeout", "message": f"timed out after {self.spec.timeout_s}s"},
                    run_s=time.perf_counter() - t0,
                )
            except Crash as exc:
                self._healthy = False
                return Outcome("crashed", error={"type": "Crashed", "message": str(exc)})
            except OOM:
                self._healthy = False
                return Outcome(
                    "oom",
                    error={
                        "type": "MemoryLimitExceeded",
                        "message": "memory limit exceeded",
                        "limit_mb": self.spec.memory_mb,
                    },
                )
            except Exception as exc:
                return Outcome(
                    "error",
                    error={
                        "type": type(exc).__name__,
                        "message": str(exc),
                        "traceback": traceback.format_exc(),
                    },
                    logs=f.logs_per_call,
                    run_s=time.perf_counter() - t0,
                )
            f.log.append(("end", self.spec.task, context.get("call_id")))
            return Outcome("ok", result=res, logs=f.logs_per_call, run_s=time.perf_counter() - t0)
        finally:
            f.running -= 1
            self._busy = False

    async def close(self) -> None:
        self._closed = True
        self.factory.closes += 1
        self.factory.live.discard(self)


class FakeFactory:
    isolated = False

    def __init__(self, handlers: dict[str, Handler] | None = None) -> None:
        self.handlers: dict[str, Handler] = dict(handlers or {})
        self.fail_start: set[str] = set()
        self.start_delay_s = 0.0
        self.logs_per_call = ""
        self.created: list[FakeEnv] = []
        self.live: set[FakeEnv] = set()
        self.starts = 0
        self.closes = 0
        self.running = 0
        self.peak_running = 0
        self.peak_memory_mb = 0
        self.peak_envs = 0
        self.log: list[tuple[str, str, Any]] = []

    def create(self, spec: EnvSpec) -> FakeEnv:
        env = FakeEnv(self, spec)
        self.created.append(env)
        return env

    def live_memory_mb(self) -> int:
        return sum(e.spec.memory_mb for e in self.live)


def make_bundle(root: Path, name: str, **manifest: Any) -> Path:
    """A bundle dir with an ``edgevisor.toml`` for a python task named ``name``."""
    d = root / f"bundle-{name}-{len(list(root.glob('bundle-*')))}"
    d.mkdir(parents=True)
    fields: dict[str, Any] = {"name": name, "runtime": "python", "handler": "main:handler"}
    fields.update(manifest)
    lines = []
    tables = []
    for k, v in fields.items():
        if isinstance(v, dict):
            body = "\n".join(f"{kk} = {_toml(vv)}" for kk, vv in v.items())
            tables.append(f"[{k}]\n{body}\n")
        else:
            lines.append(f"{k} = {_toml(v)}")
    (d / "edgevisor.toml").write_text("\n".join(lines) + "\n" + "\n".join(tables))
    (d / "main.py").write_text("def handler(event, context):\n    return event\n")
    return d


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'

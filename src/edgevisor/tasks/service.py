"""The coordinator of one host: deploy tasks, take calls, schedule and run them.

Calls go into the pure :class:`~edgevisor.tasks.scheduler.Scheduler`; the pure
:class:`~edgevisor.tasks.resources.ResourceManager` turns its dispatches into actions
(reuse a warm environment, evict idle ones, create a new one). That decide step is one
synchronous function (:meth:`Coordinator._step`) with no ``await`` inside, so on the event
loop it is atomic: that is the "one lock" of the design, without a lock object. The
actions are performed afterwards (environments created, closed, calls run).

The step runs where something changes: when a call is submitted, when one finishes, when
an environment starts or goes away, and on a timer for keep-warm expiry and prewarm. A
synchronous caller whose own call is selected runs it in its own coroutine (no task, no
extra loop hop): that is the warm path. A synchronous call that had to queue is handed
back to its waiting caller when it is selected, and runs there too (``_dispatch``); only
async calls, and calls whose caller has gone, run in tasks of their own. Async calls are
committed to the journal before their id is returned; sync calls are journaled lazily in
batches.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any, Literal, overload

from edgevisor.errors import (
    EdgevisorError,
    NotFound,
    PayloadTooLarge,
    RequestError,
    UnavailableError,
)
from edgevisor.tasks.bundles import BundleStore
from edgevisor.tasks.calls import (
    CallRecord,
    CallState,
    TaskVersion,
    env_spec,
    new_call_id,
    settle,
    version_of,
)
from edgevisor.tasks.coord_config import CoordinatorSettings
from edgevisor.tasks.environment import Environment, EnvironmentFactory, EnvSpec, Outcome
from edgevisor.tasks.idempotency import IdempotencyIndex
from edgevisor.tasks.queue import CallJournal, row_of
from edgevisor.tasks.resources import Action, Create, Evict, Expire, ResourceManager, Reuse
from edgevisor.tasks.scheduler import Demand, Resources, Scheduler
from edgevisor.tasks.spec import SpecError, load_manifest

__all__ = ["CallFailed", "Coordinator", "CoordinatorSettings"]

log = logging.getLogger(__name__)


class CallFailed(EdgevisorError):
    """A task-to-task call did not succeed; ``details`` holds the callee's record."""


class Coordinator:
    """Tasks, queue, scheduler, resource manager and environments of one host."""

    def __init__(
        self,
        factory: EnvironmentFactory,
        settings: CoordinatorSettings,
        data_dir: Path,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.factory = factory
        self.settings = settings
        self.data_dir = data_dir
        self._clock = clock
        self._wall = wall_clock
        self.capacity = Resources(settings.memory_mb, round(settings.cpu * 1000), settings.max_envs)
        self._sched = Scheduler(
            self.capacity,
            aging_s=settings.aging_s,
            queue_bound=settings.queue_bound,
            retry_after_s=settings.retry_after_s,
        )
        self._rm = ResourceManager(self.capacity)
        self._bundles = BundleStore(data_dir / "bundles", max_bytes=settings.bundle_max_bytes)
        self._journal = CallJournal(data_dir / "calls.db", lazy_delay_s=settings.journal_delay_s)
        self._versions: dict[str, TaskVersion] = {}
        self._current: dict[str, str] = {}
        self._keys: set[str] = set()  # versions registered with scheduler + resource manager
        self._envspecs: dict[str, EnvSpec] = {}
        self._envs: dict[int, Environment] = {}
        self._calls: dict[str, CallState] = {}
        self._done: OrderedDict[str, CallRecord] = OrderedDict()
        self._idem = IdempotencyIndex(self._journal.by_idempotency_key)
        self._bg: set[asyncio.Task[Any]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._started = False
        self._closed = False

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Open the journal, reload deployed tasks, re-enqueue unfinished calls."""
        await self._journal.open()
        current, versions = await self._journal.load_tasks()
        self._versions.update(versions)
        self._current.update(current)
        now, recovered = self._clock(), 0
        for rec in await self._journal.open_calls():
            tv = self._versions.get(rec.version)
            if tv is None or self._bundles.get(tv.bundle) is None:
                cur = self._current.get(rec.task)
                tv = self._versions.get(cur) if cur else None
            state = CallState(
                rec.id, rec.task, rec.version, rec.version, rec.event,
                async_=rec.async_, idempotency_key=rec.idempotency_key,
                priority=rec.priority, created_at=rec.created_at, enqueued_mono=now,
            )  # fmt: skip
            if rec.idempotency_key:
                self._idem.remember(rec.idempotency_key, rec.id)
            self._calls[rec.id] = state
            if tv is None:
                self._fail_unrunnable(state, "TaskNotFound", f"task {rec.task} is not deployed")
                continue
            state.version = state.key = tv.version
            self._ensure_key(tv)
            self._sched.enqueue(rec.id, tv.version, rec.priority, now, force=True)
            recovered += 1
        if recovered:
            log.info("re-enqueued %d unfinished calls from the journal", recovered)
        self._started = True
        self._loop_task = asyncio.create_task(self._timer_loop(), name="edgevisor-coordinator")
        self._kick()

    async def close(self) -> None:
        """Stop; close every environment; flush the journal. Unfinished async calls stay
        queued in the journal and run after the next start."""
        if self._closed:
            return
        self._closed = True
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        for t in list(self._bg):
            t.cancel()
        if self._bg:
            await asyncio.gather(*self._bg, return_exceptions=True)
        for state in list(self._calls.values()):
            for w in state.waiters:
                if not w.done():
                    w.set_exception(UnavailableError("coordinator closed"))
        envs, self._envs = list(self._envs.values()), {}
        await asyncio.gather(*(e.close() for e in envs), return_exceptions=True)
        await self._journal.close()

    async def __aenter__(self) -> Coordinator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- tasks ---------------------------------------------------------------------------

    async def deploy(
        self, source: Path | bytes, *, overrides: Mapping[str, Any] | None = None
    ) -> TaskVersion:
        """Store a bundle (dir, .zip, .tar.gz or archive bytes) and make it current."""
        bundle = await asyncio.to_thread(self._bundles.add, source)
        spec = load_manifest(bundle.path, overrides)
        if "keep_warm" not in spec.model_fields_set:
            spec = spec.model_copy(
                update={"keep_warm": spec.keep_warm.model_copy(
                    update={"idle_s": self.settings.keep_warm_idle_s})}
            )  # fmt: skip
        if spec.memory_mb > self.capacity.memory_mb:
            raise SpecError("memory", f"exceeds the host budget of {self.capacity.memory_mb} MiB")
        if round(spec.cpu * 1000) > self.capacity.cpu_milli:
            raise SpecError("cpu", f"exceeds the host budget of {self.settings.cpu} cores")
        version = version_of(bundle.digest, spec.model_dump_json())
        tv = TaskVersion(
            name=spec.name, version=version, bundle=bundle.digest, spec=spec,
            deployed_at=self._wall(),
        )  # fmt: skip
        if self.settings.validate_on_deploy and version not in self._keys:
            await self._validate(tv)
        await self._journal.save_task(tv)
        old = self._current.get(spec.name)
        self._versions[version] = tv
        self._current[spec.name] = version
        self._ensure_key(tv)
        if old is not None and old != version:
            self._perform(self._rm.retire(old))
        self._housekeep()  # prewarm the new version now, not at the next tick
        return tv

    async def _validate(self, tv: TaskVersion) -> None:
        env = self.factory.create(self._envspec(tv))
        try:
            await env.start()
        except UnavailableError:
            raise  # the sandbox itself is broken, not the bundle
        except Exception as exc:
            raise SpecError("handler", f"failed to load: {type(exc).__name__}: {exc}") from exc
        finally:
            await env.close()

    async def remove(self, name: str) -> None:
        """Remove a task: its queued calls fail; running ones finish."""
        version = self._current.pop(name, None)
        if version is None:
            raise NotFound(f"task {name} not found")
        await self._journal.remove_task(name)
        for call_id in self._sched.remove_task(version):
            state = self._calls.get(call_id)
            if state is not None:
                self._fail_unrunnable(state, "TaskRemoved", f"task {name} was removed")
        self._keys.discard(version)
        self._perform(self._rm.retire(version))

    def list(self) -> builtins.list[TaskVersion]:
        return [self._versions[v] for _, v in sorted(self._current.items())]

    def show(self, name: str) -> TaskVersion:
        version = self._current.get(name)
        if version is None:
            raise NotFound(f"task {name} not found")
        return self._versions[version]

    def bundle_archive(self, digest: str) -> bytes:
        """The deterministic archive of a stored bundle (for the controller)."""
        return self._bundles.archive_bytes(digest)

    # -- calls ---------------------------------------------------------------------------

    @overload
    async def invoke(
        self, name: str, event: Any = None, *, async_: Literal[False] = False,
        idempotency_key: str | None = None, priority: int | None = None,
    ) -> CallRecord: ...  # fmt: skip

    @overload
    async def invoke(
        self, name: str, event: Any = None, *, async_: Literal[True],
        idempotency_key: str | None = None, priority: int | None = None,
    ) -> str: ...  # fmt: skip

    @overload
    async def invoke(
        self, name: str, event: Any = None, *, async_: bool,
        idempotency_key: str | None = None, priority: int | None = None,
    ) -> CallRecord | str: ...  # fmt: skip

    async def invoke(
        self,
        name: str,
        event: Any = None,
        *,
        async_: bool = False,
        idempotency_key: str | None = None,
        priority: int | None = None,
    ) -> CallRecord | str:
        """Run a call: sync returns its record; async returns its id once journaled."""
        if not self._started or self._closed:
            raise UnavailableError("coordinator is not running")
        version = self._current.get(name)
        if version is None:
            raise NotFound(f"task {name} not found")
        try:
            event_json = json.dumps(event, separators=(",", ":"))
        except (TypeError, ValueError) as exc:
            raise RequestError(f"event is not JSON-serialisable: {exc}") from exc
        if len(event_json) > self.settings.payload_limit_bytes:  # ASCII-only JSON: chars == bytes
            raise PayloadTooLarge(
                f"event of {len(event_json)} bytes exceeds the limit of "
                f"{self.settings.payload_limit_bytes}",
            )
        if idempotency_key is not None:
            existing, claim = await self._idem.lookup(idempotency_key)
            if existing is not None:
                return existing if async_ else await self.wait_call(existing)
        else:
            claim = None
        tv = self._versions[version]
        prio = tv.spec.priority if priority is None else priority
        call_id = new_call_id()
        state = CallState(
            call_id, name, version, version, event, async_=async_,
            idempotency_key=idempotency_key, priority=prio,
            created_at=self._wall(), enqueued_mono=self._clock(),
        )  # fmt: skip
        state.event_json = event_json
        try:
            if async_:
                self._sched.check_room()  # 429 before anything is written
                self._calls[call_id] = state
                await self._journal.persist(row_of(state, event_json))
                if self._sched.has_task(version):
                    self._sched.enqueue(call_id, version, prio, self._clock(), force=True)
                else:  # removed while the row was being committed
                    self._fail_unrunnable(state, "TaskRemoved", f"task {name} was removed")
            else:
                self._sched.enqueue(call_id, version, prio, state.enqueued_mono)
                self._calls[call_id] = state
        except BaseException as exc:
            self._calls.pop(call_id, None)
            if claim is not None:
                self._idem.abandon(idempotency_key or "", claim, exc)
            raise
        if claim is not None:
            self._idem.settle(idempotency_key or "", claim, call_id)
        if async_:
            self._kick()
            return call_id
        loop = asyncio.get_running_loop()
        # Resolved with the record when the call ends, or with its dispatch when it leaves
        # the queue: then this coroutine runs it (see _dispatch).
        fut: asyncio.Future[Any] = loop.create_future()
        state.waiters.append(fut)
        state.runner = fut
        mine = self._kick(inline=call_id)
        if mine is None:
            try:
                got = await fut
            except asyncio.CancelledError:
                # the caller went away (e.g. an HTTP client disconnected): do not run it
                # later; if it was dispatched already, it runs without the caller.
                if fut.done() and not fut.cancelled() and isinstance(fut.result(), tuple):
                    self._spawn(self._run_call(*fut.result()))
                elif self._sched.cancel(call_id):
                    self._fail_unrunnable(state, "Cancelled", "the caller cancelled the call")
                raise
            if not isinstance(got, tuple):
                ended: CallRecord = got  # ended without running here (failed, removed, ...)
                return ended
            if self._closed:  # closed between the dispatch and this caller's turn
                raise UnavailableError("coordinator closed")
            mine = got
            fut = loop.create_future()
            state.waiters.append(fut)
        state.runner = None
        await self._run_call(*mine)
        result: CallRecord = await fut
        return result

    async def get_call(self, call_id: str) -> CallRecord:
        state = self._calls.get(call_id)
        if state is not None:
            return state.record()
        rec = self._done.get(call_id)
        if rec is None:
            rec = await self._journal.get(call_id)
        if rec is None:
            raise NotFound(f"call {call_id} not found")
        return rec

    async def wait_call(self, call_id: str, timeout_s: float | None = None) -> CallRecord:
        """Wait until a call has ended and return its record."""
        state = self._calls.get(call_id)
        if state is None:
            return await self.get_call(call_id)
        fut: asyncio.Future[CallRecord] = asyncio.get_running_loop().create_future()
        state.waiters.append(fut)
        async with asyncio.timeout(timeout_s):
            return await fut

    async def flush(self) -> None:
        """Wait until every journal write so far is committed."""
        await self._journal.flush()

    def stats(self) -> dict[str, Any]:
        usage = self._rm.usage()
        return {
            "pending": self._sched.pending_count,
            "in_flight": len(self._calls),
            "envs": usage.envs,
            "memory_mb_used": usage.memory_mb,
            "cpu_milli_busy": usage.cpu_milli,
        }

    # -- the decide step and its actions -------------------------------------------------

    def _step(self) -> builtins.list[Action]:
        """The pure decision: scheduler + resource manager. No await, no I/O."""
        if not self._sched.pending_count:
            return []  # nothing queued: nothing to decide (half the kicks, at steady load)
        now = self._clock()
        dispatches = self._sched.decide(self._rm.free_for_calls(), now)
        if not dispatches:
            return []
        wall = self._wall()
        for d in dispatches:
            state = self._calls[d.call_id]
            state.status = "running"
            state.queue_wait_s = now - state.enqueued_mono
            state.started_at = wall
        return self._rm.place(dispatches, now)

    def _kick(self, inline: str | None = None) -> tuple[int, str, bool] | None:
        """Decide and perform; return the action for ``inline`` if it was selected."""
        if self._closed:
            return None
        return self._perform(self._step(), inline)

    def _perform(
        self, actions: builtins.list[Action], inline: str | None = None
    ) -> tuple[int, str, bool] | None:
        mine: tuple[int, str, bool] | None = None
        for a in actions:
            if isinstance(a, Reuse):
                if a.call_id == inline:
                    mine = (a.env_id, a.call_id, False)
                else:
                    self._dispatch(a.env_id, a.call_id, False)
            elif isinstance(a, Create):
                if a.call_id is None:
                    self._spawn(self._prewarm(a.env_id, a.key))
                elif a.call_id == inline:
                    mine = (a.env_id, a.call_id, True)
                else:
                    self._dispatch(a.env_id, a.call_id, True)
            elif isinstance(a, Evict | Expire):
                env = self._envs.pop(a.env_id, None)
                if env is not None:
                    self._spawn(self._close_env(env))
        return mine

    def _dispatch(self, env_id: int, call_id: str, fresh: bool) -> None:
        """Start a dispatched call: in its sync caller's coroutine when one waits for it
        (it has to wake up anyway; a task of its own would cost a second wake-up), else in
        a task."""
        state = self._calls.get(call_id)
        runner = state.runner if state is not None else None
        if runner is not None and not runner.done():
            state.runner = None  # type: ignore[union-attr]
            runner.set_result((env_id, call_id, fresh))
        else:
            self._spawn(self._run_call(env_id, call_id, fresh))

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    async def _close_env(self, env: Environment) -> None:
        try:
            await env.close()
        except Exception:
            log.exception("closing environment of %s failed", env.spec.task)

    async def _prewarm(self, env_id: int, key: str) -> None:
        env = self.factory.create(self._envspecs[key])
        self._envs[env_id] = env
        try:
            await env.start()
            ok = True
        except Exception:
            log.exception("prewarming %s failed", key)
            ok = False
        self._perform(self._rm.started(env_id, ok=ok, now=self._clock()))
        if not ok:
            self._envs.pop(env_id, None)
            await self._close_env(env)
        self._kick()

    async def _run_call(self, env_id: int, call_id: str, fresh: bool) -> None:
        state = self._calls[call_id]
        start_s = 0.0
        healthy = False  # an environment is reused only if it says it is still healthy
        try:
            if fresh:
                env = self.factory.create(self._envspecs[state.key])
                self._envs[env_id] = env
                try:
                    start_s = await env.start()
                except Exception as exc:
                    outcome = Outcome(
                        "crashed",
                        error={"type": type(exc).__name__, "message": f"start failed: {exc}"},
                    )
                else:
                    outcome = await self._invoke_env(env, state)
                    healthy = env.healthy
            else:
                env = self._envs[env_id]
                outcome = await self._invoke_env(env, state)
                healthy = env.healthy
        except asyncio.CancelledError:
            if self._closed:
                raise  # shutdown: the call stays open in the journal and runs after a restart
            outcome = Outcome("crashed", error={"type": "Cancelled", "message": "call cancelled"})
            self._finish(state, outcome, start_s)
            self._release(env_id, state.key, healthy=False)
            raise
        except Exception as exc:  # an environment implementation bug: keep the host going
            log.exception("environment failed on call %s", call_id)
            outcome = Outcome("crashed", error={"type": type(exc).__name__, "message": str(exc)})
            healthy = False
        self._finish(state, outcome, start_s)
        self._release(env_id, state.key, healthy=healthy)
        self._kick()

    async def _invoke_env(self, env: Environment, state: CallState) -> Outcome:
        context = {"call_id": state.id, "task": state.task, "version": state.version}
        return await env.invoke(state.event, context, self._subcall)

    def _release(self, env_id: int, key: str, *, healthy: bool) -> None:
        self._sched.complete(key)
        self._perform(self._rm.release(env_id, healthy=healthy, now=self._clock()))

    def _finish(self, state: CallState, outcome: Outcome, start_s: float) -> None:
        result_json = settle(state, outcome, start_s, log_cap_bytes=self.settings.log_cap_bytes,
                             now=self._wall())  # fmt: skip
        self._complete(state, result_json)

    def _fail_unrunnable(self, state: CallState, kind: str, message: str) -> None:
        state.status = "failed"
        state.error = {"type": kind, "message": message}
        state.finished_at = self._wall()
        self._complete(state, None)

    def _complete(self, state: CallState, result_json: str | None) -> None:
        self._calls.pop(state.id, None)
        rec = state.record()
        self._done[state.id] = rec
        if len(self._done) > self.settings.records_kept:
            _, old = self._done.popitem(last=False)
            if old.idempotency_key is not None:
                self._idem.forget(old.idempotency_key)
        for w in state.waiters:
            if not w.done():
                w.set_result(rec)
        if state.async_ or self.settings.journal_sync_calls:
            self._journal.persist_lazily(row_of(state, None, result_json))

    async def _subcall(self, task: str, event: Any, async_: bool) -> Any:
        if async_:
            return await self.invoke(task, event, async_=True)
        rec = await self.invoke(task, event)
        if rec.status != "succeeded":
            raise CallFailed(
                f"call of {task} ended {rec.status}",
                details={"call_id": rec.id, "status": rec.status, "error": rec.error},
            )
        return rec.result

    # -- keys and the timer --------------------------------------------------------------

    def _envspec(self, tv: TaskVersion) -> EnvSpec:
        return env_spec(tv, self._bundles.root)

    def _ensure_key(self, tv: TaskVersion) -> None:
        """Register a version with the scheduler and resource manager (again after a
        rollback: the resource manager forgets retired keys)."""
        s = tv.spec
        demand = Demand(s.memory_mb, round(s.cpu * 1000))
        self._sched.set_task(tv.version, demand, s.concurrency)
        self._rm.register(
            tv.version, demand, idle_s=s.keep_warm.idle_s, prewarm=s.keep_warm.prewarm
        )
        self._envspecs[tv.version] = self._envspec(tv)
        self._keys.add(tv.version)

    async def _prune(self) -> None:
        try:
            n = await self._journal.prune(self._wall() - self.settings.journal_retention_s)
        except UnavailableError:
            log.exception("pruning the call journal failed")
            return
        if n:
            log.info("pruned %d finished calls from the journal", n)

    def _housekeep(self) -> None:
        self._perform(self._rm.housekeep(self._clock()))
        self._kick()

    async def _timer_loop(self) -> None:
        # A plain sleep, not wait_for on an event: on 3.11, wait_for can swallow the
        # cancellation that close() sends (seen as close() hanging).
        next_prune = 0.0
        while True:
            self._housekeep()
            if self._clock() >= next_prune:
                next_prune = self._clock() + 600.0
                self._spawn(self._prune())
            delay = self.settings.housekeep_interval_s
            deadline = self._rm.next_deadline()
            if deadline is not None:
                delay = min(delay, max(0.0, deadline - self._clock()) + 0.001)
            await asyncio.sleep(delay)

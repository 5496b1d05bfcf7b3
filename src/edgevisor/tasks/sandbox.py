"""Execution environments: isolated (bubblewrap + cgroup v1, as root) and plain (rlimits).

Both kinds run the same runtime (``tasks/runtime/evruntime.py``) and speak the same framed
protocol (``proto/runtime.py``) over two inherited pipes; they differ in how the process is
started, limited, killed, and how its death is explained. This module holds what they
share, the plain kind and both factories; the isolated kind is in :mod:`.isolation`.

Theory of operation (one environment)::

    new --start()--> starting --Ready--> warm <--invoke()--> busy
                         |                 |                   |  timeout / EOF / bad frame
                         +--- failure ---> dead <--------------+  (environment killed)
    any --close()--> closed  (every process killed, cgroups removed, fds closed)

``healthy`` is True only in ``warm``. A handler that raises leaves the environment warm;
a timeout, crash, OOM kill or protocol violation kills it, and the call's Outcome says
which (``timeout``, ``crashed`` with the signal, ``oom`` with the limit).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from edgevisor.errors import EdgevisorError, RequestError, UnavailableError
from edgevisor.proto import runtime as proto
from edgevisor.tasks import runtime as rt
from edgevisor.tasks.cgroups import cgroups_available
from edgevisor.tasks.environment import Environment, EnvSpec, Outcome, SubcallFn

if TYPE_CHECKING:
    from edgevisor.tasks.isolation import IsolatedEnvironment, StemPool

__all__ = [
    "EnvironmentStartError",
    "HandlerLoadError",
    "IsolatedFactory",
    "PlainEnvironment",
    "PlainFactory",
    "SandboxSettings",
    "default_factory",
    "isolation_available",
    "plain_isolation_warning",
]

_READ_CHUNK = 1 << 16
_names = itertools.count(1)


class SandboxSettings(BaseModel):
    """Settings of the execution-environment factories (section ``sandbox``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    uid: int = Field(65534, description="Unprivileged uid a task runs as in isolated mode.")
    gid: int = Field(65534, description="Unprivileged gid a task runs as in isolated mode.")
    log_cap_bytes: int = Field(
        64 * 1024, gt=0, description="Captured stdout+stderr kept per call; the rest is cut."
    )
    max_frame_bytes: int = Field(
        8 * 1024 * 1024,
        gt=1024,
        description="Largest protocol frame (event, result, log) between agent and runtime.",
    )
    start_timeout_s: float = Field(
        30.0, gt=0, description="How long a new environment may take to load its handler."
    )
    stem_memory_mb: int = Field(
        64, gt=8, description="Memory limit of a prewarmed sandbox before it gets a task."
    )
    runtime_dir: Path | None = Field(
        None, description="Where the runtime files are staged; a private temp dir if unset."
    )


class HandlerLoadError(RequestError):
    """The bundle's handler could not be loaded (import error, missing function, ...)."""

    code = "handler_load_failed"


class EnvironmentStartError(UnavailableError):
    """The environment itself could not be started (sandbox tool, cgroups, no Ready)."""

    code = "environment_start_failed"


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def _set_nonblocking(fd: int) -> None:
    os.set_blocking(fd, False)


async def _wait_readable(fd: int) -> None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    loop.add_reader(fd, ready)
    try:
        await fut
    finally:
        loop.remove_reader(fd)


async def _wait_writable(fd: int) -> None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    loop.add_writer(fd, ready)
    try:
        await fut
    finally:
        loop.remove_writer(fd)


async def _read_to_eof(fd: int, limit: int = 1 << 16) -> bytes:
    """Read a non-blocking fd until EOF (or ``limit`` bytes) without blocking the loop."""
    data = b""
    while len(data) < limit:
        try:
            chunk = os.read(fd, limit)
        except BlockingIOError:
            await _wait_readable(fd)
            continue
        if not chunk:
            break
        data += chunk
    return data


class _CallTimer:
    """The timeout of an environment's call in progress, without a timer per call.

    ``asyncio.timeout`` arms and cancels a timer handle per call (plus its bookkeeping),
    a visible cost at thousands of warm calls a second. Here one handle stays armed while
    calls come and go: a call only sets its deadline; when the handle fires it compares
    the time with the deadline of the call then in progress, re-arms for a later one,
    disarms when no call runs, and cancels the calling task when the deadline has passed
    (``fired`` then tells the caller that the cancellation was a timeout).
    """

    __slots__ = ("_deadline", "_handle", "_task", "fired")

    def __init__(self) -> None:
        self._deadline = 0.0
        self._handle: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[Any] | None = None
        self.fired = False

    def start(self, task: asyncio.Task[Any], timeout_s: float) -> None:
        loop = asyncio.get_running_loop()
        self._deadline = loop.time() + timeout_s
        self._task = task
        self.fired = False
        if self._handle is None or self._handle.when() > self._deadline:
            if self._handle is not None:
                self._handle.cancel()
            self._handle = loop.call_at(self._deadline, self._check)

    def stop(self) -> None:
        self._task = None  # the armed handle finds no call and disarms

    def close(self) -> None:
        self._task = None
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _check(self) -> None:
        self._handle = None
        task = self._task
        if task is None:
            return
        loop = asyncio.get_running_loop()
        if loop.time() < self._deadline:
            self._handle = loop.call_at(self._deadline, self._check)
            return
        self._task = None
        self.fired = True
        task.cancel()


class _ProcessEnvironment:
    """What both kinds share: the pipes, the protocol, invoke, timeouts, outcomes."""

    isolated = False

    def __init__(self, spec: EnvSpec, settings: SandboxSettings, runtime_dir: Path) -> None:
        self.spec = spec
        self._settings = settings
        self._runtime_dir = runtime_dir
        self._conn = proto.RuntimeConnection(
            "coordinator", max_frame_bytes=settings.max_frame_bytes
        )
        self._proc: subprocess.Popen[bytes] | None = None
        self._rfd = -1  # runtime -> us
        self._wfd = -1  # us -> runtime
        self._errfd = -1  # the process's stderr (sandbox tool errors; read only on failure)
        self._waiter: asyncio.Future[None] | None = None
        self._eof = False
        self._state = "new"
        self._init_s = 0.0
        self._first_call = True
        self._timer = _CallTimer()

    # -- the contract ------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        return self._state == "warm" and not self._eof

    @property
    def pid(self) -> int | None:
        """Host pid of the process we started (bwrap or the runtime)."""
        return self._proc.pid if self._proc else None

    async def start(self) -> float:
        if self._state != "new":
            raise RuntimeError(f"environment already {self._state}")
        self._state = "starting"
        t0 = time.perf_counter()
        try:
            await self._spawn()
            await self._await_ready()
        except proto.RemoteProtocolError as exc:
            await self.close()
            raise EnvironmentStartError(f"task {self.spec.task!r}: runtime: {exc}") from exc
        except BaseException:
            await self.close()
            raise
        # The stderr pipe stays open (unread) until close: a sandbox tool that writes an error
        # later must not die of SIGPIPE.
        self._state = "warm"
        self._init_s = time.perf_counter() - t0
        return self._init_s

    async def _await_ready(self) -> None:
        try:
            async with asyncio.timeout(self._settings.start_timeout_s):
                ev = await self._next_event()
        except TimeoutError:
            raise EnvironmentStartError(
                f"task {self.spec.task!r}: no Ready within {self._settings.start_timeout_s} s"
            ) from None
        if isinstance(ev, proto.Ready) and ev.error is not None:
            err = ev.error
            raise HandlerLoadError(
                f"task {self.spec.task!r}: handler {self.spec.handler!r} failed to load: "
                f"{err.get('type')}: {err.get('message')}",
                details=err,
            )
        if not isinstance(ev, proto.Ready):
            detail = await self._startup_stderr()
            status = await self._wait_exit(2.0)
            raise EnvironmentStartError(
                f"task {self.spec.task!r}: environment exited before Ready "
                f"(status {status}): {detail}"
            )

    async def invoke(
        self, event: Any, context: dict[str, Any], subcall: SubcallFn | None = None
    ) -> Outcome:
        if not self.healthy:
            return Outcome(
                "crashed",
                error={
                    "type": "EnvironmentUnusable",
                    "message": f"environment is {self._state}",
                },
            )
        call_id = str(context.get("call_id") or uuid.uuid4().hex)
        ctx = {
            **context,
            "call_id": call_id,
            "task": self.spec.task,
            "version": self.spec.version,
            "timeout_s": self.spec.timeout_s,
        }
        try:
            frame = self._conn.send(proto.Invoke(call_id, event, ctx))
        except proto.LocalProtocolError as exc:
            return Outcome("error", error={"type": "InvalidEvent", "message": str(exc)})
        init_s, self._first_call = (self._init_s if self._first_call else 0.0), False
        self._state = "busy"
        logs: list[bytes] = []
        result: proto.Result | None = None
        t0 = time.perf_counter()
        task = asyncio.current_task()
        assert task is not None
        cancelling = task.cancelling()
        self._timer.start(task, self.spec.timeout_s)
        try:
            await self._write(frame)
            while True:
                ev = await self._next_event()
                if isinstance(ev, proto.Log):
                    # The runtime caps its output; a hostile one is capped here too.
                    cap = self._settings.log_cap_bytes + 1024  # + the truncation note
                    if sum(map(len, logs)) < cap:
                        logs.append(ev.data[:cap])
                elif isinstance(ev, proto.Subcall):
                    await self._answer_subcall(ev, subcall)
                elif isinstance(ev, proto.Result):
                    result = ev
                    break
                else:  # Closed: the runtime died mid-call
                    self._timer.stop()
                    run_s = time.perf_counter() - t0
                    return await self._death_outcome(_text(logs), init_s, run_s)
        except asyncio.CancelledError:
            # A timeout only if the call timer fired and nobody else cancelled as well (the
            # rule of asyncio.timeout); any other cancellation goes on.
            self._timer.stop()
            if not self._timer.fired or task.uncancel() > cancelling:
                raise
            self._timer.fired = False
            run_s = time.perf_counter() - t0
            await self._kill()
            return Outcome(
                "timeout",
                error={
                    "type": "Timeout",
                    "message": f"call exceeded the task's timeout of {self.spec.timeout_s} s",
                    "timeout_s": self.spec.timeout_s,
                },
                logs=_text(logs),
                init_s=init_s,
                run_s=run_s,
            )
        except (proto.RemoteProtocolError, OSError) as exc:
            self._timer.stop()
            run_s = time.perf_counter() - t0
            await self._kill()
            return Outcome(
                "crashed",
                error={
                    "type": "ProtocolError",
                    "message": f"runtime broke the protocol: {exc}",
                },
                logs=_text(logs),
                init_s=init_s,
                run_s=run_s,
            )
        self._timer.stop()
        run_s = time.perf_counter() - t0
        self._state = "warm"
        if result.ok:
            return Outcome("ok", result=result.value, logs=_text(logs), init_s=init_s, run_s=run_s)
        error = dict(result.error or {})
        return self._error_outcome(error, _text(logs), init_s, run_s)

    async def close(self) -> None:
        if self._state == "closed":
            return
        self._state = "closed"
        self._timer.close()
        self._stop_reading()
        with contextlib.suppress(Exception):
            await self._kill()
        for fd in (self._wfd, self._rfd):
            if fd >= 0:
                os.close(fd)
        self._wfd = self._rfd = -1
        self._close_errfd()
        await self._wait_exit(5.0)
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        await self._cleanup()

    # -- for the two kinds -------------------------------------------------------------

    async def _spawn(self) -> None:
        raise NotImplementedError

    async def _kill(self) -> None:
        """Kill every process of the environment (it is then no longer healthy)."""
        raise NotImplementedError

    async def _cleanup(self) -> None:
        """Release what the kind holds after the processes are gone."""

    def _classify_death(self, status: int | None) -> tuple[str, dict[str, Any]]:
        raise NotImplementedError

    def _error_outcome(
        self, error: dict[str, Any], logs: str, init_s: float, run_s: float
    ) -> Outcome:
        return Outcome("error", error=error, logs=logs, init_s=init_s, run_s=run_s)

    # -- plumbing ----------------------------------------------------------------------

    def _attach(self, proc: subprocess.Popen[bytes], rfd: int, wfd: int, errfd: int) -> None:
        self._proc, self._rfd, self._wfd, self._errfd = proc, rfd, wfd, errfd
        for fd in (rfd, wfd, errfd):
            _set_nonblocking(fd)
        asyncio.get_running_loop().add_reader(rfd, self._on_readable)

    def _on_readable(self) -> None:
        try:
            data = os.read(self._rfd, _READ_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._eof = True
            self._stop_reading()
        elif self._state not in ("starting", "busy"):
            # Bytes while no call runs: a handler's leftover thread talking on the protocol
            # pipe. Stop reading (so it cannot grow our buffers) and treat it as dead.
            self._stop_reading()
            self._eof = True
            if self._state == "warm":
                self._state = "dead"
            return
        self._conn.receive_data(data)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _stop_reading(self) -> None:
        if self._rfd >= 0:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._rfd)

    async def _next_event(self) -> proto.Event:
        while True:
            ev = self._conn.next_event()
            if ev is not proto.NEED_DATA:
                return ev
            if self._eof:  # the core saw EOF already; next_event returns Closed next
                continue
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    async def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(self._wfd, view)
            except BlockingIOError:
                await _wait_writable(self._wfd)
                continue
            view = view[n:]

    async def _answer_subcall(self, ev: proto.Subcall, subcall: SubcallFn | None) -> None:
        if subcall is None:
            reply = proto.SubcallResult(
                ev.id,
                ev.sub_id,
                False,
                None,
                {
                    "type": "SubcallUnavailable",
                    "message": "task-to-task calls are not wired here",
                },
            )
        else:
            try:
                value = await subcall(ev.task, ev.event, ev.async_)
                reply = proto.SubcallResult(ev.id, ev.sub_id, True, value)
            except Exception as exc:
                err: dict[str, Any] = {"type": type(exc).__name__, "message": str(exc)}
                if isinstance(exc, EdgevisorError):
                    err["code"] = exc.code
                reply = proto.SubcallResult(ev.id, ev.sub_id, False, None, err)
        try:
            frame = self._conn.send(reply)
        except proto.LocalProtocolError as exc:
            frame = self._conn.send(
                proto.SubcallResult(
                    ev.id,
                    ev.sub_id,
                    False,
                    None,
                    {
                        "type": "ResultError",
                        "message": f"subcall result cannot be sent: {exc}",
                    },
                )
            )
        await self._write(frame)

    async def _wait_exit(self, timeout_s: float) -> int | None:
        """Reap the started process; its exit status, or None if it is still running."""
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is not None:
            return proc.returncode
        try:
            pidfd = os.pidfd_open(proc.pid)
        except ProcessLookupError:
            return proc.poll()
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await _wait_readable(pidfd)
        finally:
            os.close(pidfd)
        return proc.poll()

    async def _death_outcome(self, logs: str, init_s: float, run_s: float) -> Outcome:
        self._state = "dead"
        status = await self._wait_exit(5.0)
        kind, error = self._classify_death(status)
        await self._kill()
        return Outcome(kind, error=error, logs=logs, init_s=init_s, run_s=run_s)  # type: ignore[arg-type]

    async def _startup_stderr(self) -> str:
        if self._errfd < 0:
            return ""
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(2.0):
                return (await _read_to_eof(self._errfd, 8192)).decode("utf-8", "replace").strip()
        return ""

    def _close_errfd(self) -> None:
        if self._errfd >= 0:
            os.close(self._errfd)
            self._errfd = -1


def _text(chunks: list[bytes]) -> str:
    return b"".join(chunks).decode("utf-8", "replace")


def _runtime_config(
    spec: EnvSpec,
    settings: SandboxSettings,
    bundle: str,
    rlimits: dict[str, int] | None = None,
    stem: bool = False,
) -> dict[str, Any]:
    return {
        "bundle": bundle,
        "runtime": spec.runtime,
        "handler": spec.handler,
        "log_cap_bytes": settings.log_cap_bytes,
        "max_frame_bytes": settings.max_frame_bytes,
        "rlimits": rlimits or {},
        "stem": stem,
    }


def _base_env(spec: EnvSpec, home: str) -> dict[str, str]:
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": home,
        "LANG": "C.UTF-8",
        "TMPDIR": "/tmp",
        **spec.env,
    }


# -- plain -----------------------------------------------------------------------------


def plain_isolation_warning() -> str:
    """What a user loses when environments run without root (printed at agent start)."""
    return (
        "edgevisor is not running as root (or bubblewrap / cgroup v1 are missing): tasks run "
        "as plain subprocesses of the agent, as the agent's user. Missing isolation: no pid, "
        "mount, network, ipc or uts namespaces (a task sees the host's processes, files and "
        "network, and can read whatever the agent's user can read, including the agent's data "
        "dir); no cgroups (memory is limited by RLIMIT_DATA per process only, CPU time by "
        "RLIMIT_CPU per call, processes by RLIMIT_NPROC across the whole user; no CPU share); "
        "no uid switch and no private /tmp. Run the agent as root for isolated environments."
    )


class PlainEnvironment(_ProcessEnvironment):
    """A subprocess in its own session with rlimits; no namespaces, no cgroups."""

    async def _spawn(self) -> None:
        spec = self.spec
        rlimits = {"RLIMIT_DATA": spec.memory_mb * 1024 * 1024}
        if os.geteuid() != 0:  # per user: room for this task's processes on top of the rest
            rlimits["RLIMIT_NPROC"] = _user_process_count() + spec.pids_max
        config = _runtime_config(spec, self._settings, str(spec.bundle_dir), rlimits)
        config["cpu_guard_s"] = int(spec.timeout_s) + 1
        to_rt_r, to_rt_w = os.pipe()
        from_rt_r, from_rt_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            proc = subprocess.Popen(
                rt.launch_argv(str(self._runtime_dir), config),
                stdin=to_rt_r,
                stdout=from_rt_w,
                stderr=err_w,
                start_new_session=True,
                env=_base_env(spec, tempfile.gettempdir()),
                close_fds=True,
            )
        except OSError as exc:
            for fd in (to_rt_r, to_rt_w, from_rt_r, from_rt_w, err_r, err_w):
                os.close(fd)
            raise EnvironmentStartError(f"cannot start the runtime: {exc}") from exc
        for fd in (to_rt_r, from_rt_w, err_w):
            os.close(fd)
        self._attach(proc, from_rt_r, to_rt_w, err_r)

    async def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._proc.pid, signal.SIGKILL)
        if self._state != "closed":
            self._state = "dead"

    def _classify_death(self, status: int | None) -> tuple[str, dict[str, Any]]:
        if status is not None and status < 0:
            name = _signal_name(-status)
            return "crashed", {
                "type": "Crashed",
                "message": f"runtime killed by {name}",
                "signal": name,
            }
        return "crashed", {
            "type": "Crashed",
            "message": f"runtime exited with status {status}",
            "exit_status": status,
        }

    def _error_outcome(
        self, error: dict[str, Any], logs: str, init_s: float, run_s: float
    ) -> Outcome:
        if error.get("type") == "MemoryError":
            # RLIMIT_DATA refused an allocation: the plain form of an OOM kill. The heap may
            # be in any state now, so the environment is not reused.
            self._state = "dead"
            return Outcome(
                "oom",
                error={
                    **error,
                    "type": "MemoryLimitExceeded",
                    "message": f"memory limit exceeded ({self.spec.memory_mb} MB)",
                    "limit_mb": self.spec.memory_mb,
                },
                logs=logs,
                init_s=init_s,
                run_s=run_s,
            )
        return super()._error_outcome(error, logs, init_s, run_s)


def _user_process_count() -> int:
    uid = os.getuid()
    count = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if entry.stat().st_uid == uid:
                    count += 1
    return count


# -- factories -------------------------------------------------------------------------


class _RuntimeFiles:
    """The staged runtime directory, made once per factory and removed with it."""

    def __init__(self, settings: SandboxSettings) -> None:
        self._own = settings.runtime_dir is None
        base = settings.runtime_dir or Path(tempfile.mkdtemp(prefix="edgevisor-runtime-"))
        self.path = rt.prepare_runtime_dir(base)

    def remove(self) -> None:
        if self._own:
            shutil.rmtree(self.path, ignore_errors=True)


class IsolatedFactory:
    """Environments in namespaces + cgroups. Needs root, ``bwrap`` and cgroup v1."""

    isolated = True

    def __init__(self, settings: SandboxSettings | None = None) -> None:
        # isolation.py builds on this module's base class: import it when first needed.
        from edgevisor.tasks.isolation import StemPool

        self.settings = settings or SandboxSettings()
        reason = isolation_unavailable_reason()
        if reason:
            raise EnvironmentStartError(f"isolated environments unavailable: {reason}")
        self._files = _RuntimeFiles(self.settings)
        self._stage_root = Path(tempfile.mkdtemp(prefix="edgevisor-stems-"))
        self._stage_root.chmod(0o711)
        self.pool: StemPool = StemPool(self.settings, self._files.path, self._stage_root)

    def create(self, spec: EnvSpec) -> IsolatedEnvironment:
        from edgevisor.tasks.isolation import IsolatedEnvironment

        return IsolatedEnvironment(spec, self.settings, self._files.path, self.pool)

    async def prewarm(self, count: int, network: str = "none", tmp_mb: int = 64) -> None:
        """Keep ``count`` prewarmed sandboxes of this network mode and /tmp size ready."""
        await self.pool.fill(count, network, tmp_mb)

    async def aclose(self) -> None:
        """Close the prewarmed sandboxes, then remove the staged files."""
        await self.pool.aclose()
        self.close()

    def close(self) -> None:
        """Remove the staged runtime files (environments must be closed first)."""
        self._files.remove()
        shutil.rmtree(self._stage_root, ignore_errors=True)


class PlainFactory:
    """Environments as plain subprocesses with rlimits (no root needed)."""

    isolated = False

    def __init__(self, settings: SandboxSettings | None = None) -> None:
        self.settings = settings or SandboxSettings()
        self._files = _RuntimeFiles(self.settings)

    def create(self, spec: EnvSpec) -> Environment:
        return PlainEnvironment(spec, self.settings, self._files.path)

    def close(self) -> None:
        self._files.remove()


def isolation_unavailable_reason() -> str | None:
    """Why isolated environments cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "not running as root"
    if shutil.which("bwrap") is None:
        return "bubblewrap (bwrap) is not installed"
    if not os.path.exists("/usr/bin/setpriv"):
        return "setpriv (util-linux) is not installed"
    if not cgroups_available():
        return "cgroup v1 memory/pids/cpu/freezer hierarchies are not mounted writable"
    return None


def isolation_available() -> bool:
    return isolation_unavailable_reason() is None


def default_factory(settings: SandboxSettings | None = None) -> IsolatedFactory | PlainFactory:
    """Isolated when possible; otherwise plain (log :func:`plain_isolation_warning`)."""
    if isolation_available():
        return IsolatedFactory(settings)
    return PlainFactory(settings)

"""The process environment both kinds share: pipes, protocol, invoke, timeouts, outcomes.

Both kinds run the same runtime (``tasks/runtime/evruntime.py``) and speak the same framed
protocol (``proto/runtime.py``) over two inherited pipes; they differ in how the process is
started, limited, killed, and how its death is explained. This module holds what they
share; the plain kind is in :mod:`.sandbox_plain`, the isolated kind in :mod:`.isolation`,
the factories in :mod:`.sandbox`.

Theory of operation (one environment)::

    new --start()--> starting --Ready--> warm <--invoke()--> busy
                         |                 |                   |  timeout / EOF / bad frame
                         +--- failure ---> dead <--------------+  (environment killed)
    any --close()--> closed  (every process killed, cgroups removed, fds closed)

``healthy`` is True only in ``warm``. A handler that raises leaves the environment warm;
a timeout, crash, OOM kill or protocol violation kills it, and the call's Outcome says
which (``timeout``, ``crashed`` with the signal, ``oom`` with the limit).

A kind supplies ``_spawn``, ``_kill``,
``_cleanup`` and the explanation of a death (``_classify_death``, ``_error_outcome``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

from edgevisor.errors import EdgevisorError
from edgevisor.proto import runtime as proto
from edgevisor.tasks.environment import EnvSpec, Outcome, SubcallFn
from edgevisor.tasks.sandbox_config import (
    EnvironmentStartError,
    HandlerLoadError,
    SandboxSettings,
)
from edgevisor.tasks.sandbox_io import (
    _CallTimer,
    _set_nonblocking,
    _wait_writable,
    read_to_eof,
    wait_readable,
)

__all__: list[str] = []

_READ_CHUNK = 1 << 16
_names = itertools.count(1)


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def _crashed(status: int | None, signo: int | None) -> tuple[str, dict[str, Any]]:
    """How a runtime that died is reported: the signal that killed it (``signo``, as the
    kind decodes it from ``status``), else its exit status."""
    if signo is not None:
        name = _signal_name(signo)
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
                    await wait_readable(pidfd)
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
                return (await read_to_eof(self._errfd, 8192)).decode("utf-8", "replace").strip()
        return ""

    def _close_errfd(self) -> None:
        if self._errfd >= 0:
            os.close(self._errfd)
            self._errfd = -1


def _text(chunks: list[bytes]) -> str:
    return b"".join(chunks).decode("utf-8", "replace")

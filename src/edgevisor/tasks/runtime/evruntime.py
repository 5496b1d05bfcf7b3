"""The runtime process that runs inside an execution environment.

Started once per environment (``python -I -S``), it loads the task's handler once, sends
``Ready`` and then serves ``Invoke`` frames on the inherited pipes (fd 0 in, fd 1 out) until
end of file, so a warm call costs no process start. It imports only the standard library
(the edgevisor package is not installed inside the sandbox) and speaks the wire format of
``edgevisor/proto/runtime.py`` with a few lines of its own framing.

The protocol pipes are moved to private descriptors at start; fd 1 and fd 2 then point at
one memfd, so everything the call writes to stdout/stderr (print, C extensions, children)
lands in it, in order. After each call the first ``log_cap_bytes`` go back in a ``Log``
frame and the memfd is emptied.
"""

from __future__ import annotations

import os
import sys
import time

# Not ``from typing import ...`` at run time: importing typing costs ~5 ms of cold start.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

# Cold start matters: the ``json`` package pulls in ``re`` (and ``dataclasses`` pulls in
# ``inspect``), ~10-20 ms on this host. The C accelerator ``_json`` behind ``json`` does the
# same work without them; ``json`` stays the fallback if it ever changes shape.
try:
    import _json
    import binascii

    class _ScanContext:
        strict = True
        object_hook = None
        object_pairs_hook = None
        parse_float = float
        parse_int = int
        memo: dict[str, Any] = {}

        @staticmethod
        def parse_constant(name: str) -> Any:
            raise ValueError(f"{name} is not JSON")

    def _not_json(obj: Any) -> Any:
        raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")

    _scan = _json.make_scanner(_ScanContext)  # type: ignore[arg-type]

    def _dumps(obj: Any) -> str:
        enc = _json.make_encoder(
            {}, _not_json, _json.encode_basestring_ascii, None, ":", ",", False, False, False
        )
        return "".join(enc(obj, 0))

    def _loads(text: str) -> Any:
        try:
            obj, end = _scan(text, 0)
        except StopIteration:
            raise ValueError("not JSON") from None
        if end != len(text):
            raise ValueError("trailing data after JSON")
        return obj

    def _b64(data: bytes) -> str:
        return binascii.b2a_base64(data, newline=False).decode("ascii")

except (ImportError, AttributeError, TypeError):  # pragma: no cover - other interpreters
    import base64
    import json

    def _dumps(obj: Any) -> str:
        return json.dumps(obj, separators=(",", ":"), allow_nan=False)

    def _loads(text: str) -> Any:
        return json.loads(text)

    def _b64(data: bytes) -> str:
        return base64.b64encode(data).decode("ascii")

_READ_CHUNK = 1 << 16
# Wire format, the same as edgevisor/proto/runtime.py (which the coordinator runs): a 4-byte
# big-endian length, then a JSON object whose "k" names the message.


class SubcallError(Exception):
    """A task-to-task call through ``context.invoke`` failed; ``type`` is the remote type."""

    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(f"{error.get('type', 'Error')}: {error.get('message', '')}")
        self.error = error
        self.type = str(error.get("type", "Error"))


class FrameTooLarge(ValueError):
    pass


class _Link:
    """Blocking frame I/O over the two protocol descriptors (the coordinator validates)."""

    def __init__(self, fd_in: int, fd_out: int, max_frame_bytes: int) -> None:
        self.fd_in = fd_in
        self.fd_out = fd_out
        self.max = max_frame_bytes
        self.buf = b""

    def encode(self, body: dict[str, Any]) -> bytes:
        """The frame for ``body``; ValueError/TypeError when it is not JSON or too large."""
        raw = _dumps(body).encode("ascii")
        if len(raw) > self.max:
            raise FrameTooLarge(f"frame of {len(raw)} bytes exceeds the limit of {self.max}")
        return len(raw).to_bytes(4, "big") + raw

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self.fd_out, view)
            view = view[n:]

    def send(self, body: dict[str, Any]) -> None:
        self.write(self.encode(body))

    def receive(self) -> dict[str, Any] | None:
        """The next message, or None at end of file."""
        while True:
            buf = self.buf
            if len(buf) >= 4:
                size = int.from_bytes(buf[:4], "big")
                if size > self.max:
                    raise SystemExit(f"runtime: frame of {size} bytes from the coordinator")
                if len(buf) >= 4 + size:
                    self.buf = buf[4 + size :]
                    body = _loads(buf[4 : 4 + size].decode("utf-8"))
                    if not isinstance(body, dict):
                        raise SystemExit("runtime: frame is not an object")
                    return body
            chunk = os.read(self.fd_in, _READ_CHUNK)
            if not chunk:
                return None
            self.buf = buf + chunk


class Context:
    """What a handler gets as its second argument (the shape of a Lambda context)."""

    def __init__(self, link: _Link, call_id: str, data: dict[str, Any]) -> None:
        self._link = link
        self._next_sub = 0
        self.call_id = call_id
        self.data = data
        self.task: str = str(data.get("task", ""))
        self.version: str = str(data.get("version", ""))
        timeout_s = data.get("timeout_s")
        # Monotonic: the deadline must not move with the wall clock.
        self.deadline: float = time.monotonic() + (
            float(timeout_s) if isinstance(timeout_s, (int, float)) else float("inf")
        )

    def remaining_s(self) -> float:
        """Seconds left before the coordinator kills this call."""
        return max(0.0, self.deadline - time.monotonic())

    def invoke(self, task: str, event: Any = None, async_: bool = False) -> Any:
        """Call another task through the coordinator; with ``async_`` return its call id."""
        self._next_sub += 1
        sub_id = self._next_sub
        self._link.send({
            "k": "subcall", "id": self.call_id, "sub_id": sub_id, "task": task,
            "event": event, "async": bool(async_),
        })
        msg = self._link.receive()
        if msg is None or msg.get("k") != "subcall_result" or msg.get("sub_id") != sub_id:
            raise SystemExit(f"runtime: expected the answer to subcall {sub_id}, got {msg!r}")
        if not msg.get("ok"):
            raise SubcallError(msg.get("error") or {})
        return msg.get("value")


def _error(exc: BaseException) -> dict[str, Any]:
    import traceback  # only on the error path: it costs milliseconds to import

    return {
        "type": type(exc).__name__,
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(exc)),
    }


class _Capture:
    """fd 1 and 2 share one memfd; take what a call wrote, up to the cap."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.fd = os.memfd_create("edgevisor-output", 0)
        os.dup2(self.fd, 1)
        os.dup2(self.fd, 2)
        # Line buffering keeps print() and writes to fd 2 in the order they happened.
        if sys.stdout is not None:
            sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]

    def take(self) -> bytes:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                try:  # noqa: SIM105 - contextlib costs ~3 ms of cold start
                    stream.flush()
                except (OSError, ValueError):
                    pass
        end = os.lseek(self.fd, 0, os.SEEK_END)
        if not end:
            return b""
        data = os.pread(self.fd, min(end, self.cap), 0)
        if end > self.cap:
            data += f"\n[output truncated: {end} bytes, cap {self.cap}]\n".encode()
        os.ftruncate(self.fd, 0)
        os.lseek(self.fd, 0, os.SEEK_SET)
        return data


def _load_python(handler: str) -> Any:
    module_name, sep, func_name = handler.partition(":")
    if not sep or not module_name or not func_name:
        raise ValueError(f"handler {handler!r} is not 'module:function'")
    __import__(module_name)
    func = getattr(sys.modules[module_name], func_name, None)
    if not callable(func):
        raise AttributeError(f"module {module_name!r} has no callable {func_name!r}")
    return func


def _run_command(path: str, event: Any, ctx: Context) -> Any:
    """The classic watchdog: one process per call, event JSON on stdin, result on stdout."""
    import subprocess

    proc = subprocess.run(
        [path], input=_dumps(event).encode(), stdout=subprocess.PIPE, stderr=2,
        check=False, env={**os.environ, "EDGEVISOR_CALL_ID": ctx.call_id},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"command exited with status {proc.returncode}")
    text = proc.stdout.decode("utf-8", "replace").strip()
    if not text:
        return None
    try:
        return _loads(text)
    except ValueError:
        raise ValueError(f"command output is not JSON: {text[:200]!r}") from None


def _apply_rlimits(limits: dict[str, int]) -> None:
    import resource

    for name, value in limits.items():
        res = getattr(resource, name)
        resource.setrlimit(res, (value, value))


def main() -> None:
    t0 = time.perf_counter()
    cfg = _loads(sys.argv[1])
    # Keep the protocol pipes away from fds 0-2, which the handler may scribble on.
    fd_in, fd_out = os.dup(0), os.dup(1)
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    link = _Link(fd_in, fd_out, int(cfg["max_frame_bytes"]))
    capture = _Capture(int(cfg["log_cap_bytes"]))
    if cfg.get("stem"):
        # Prewarmed: the process and sandbox exist before the task is known. Say so, then
        # wait for the Load that names the handler.
        link.send({"k": "ready", "init_s": time.perf_counter() - t0, "error": None})
        msg = link.receive()
        if msg is None:
            return
        if msg.get("k") != "load":
            raise SystemExit(f"runtime: expected load, got {msg.get('k')!r}")
        t0 = time.perf_counter()
        os.environ.update(msg.get("env") or {})
        cfg = {**cfg, "runtime": msg["runtime"], "handler": msg["handler"],
               "bundle": msg["bundle"]}
    runtime = cfg["runtime"]
    func: Any = None
    try:
        if cfg.get("rlimits"):
            _apply_rlimits(cfg["rlimits"])
        func = _load(runtime, cfg["handler"], cfg["bundle"])
    except BaseException as exc:
        err = _error(exc)
        out = capture.take()
        if out:
            err["output"] = out.decode("utf-8", "replace")[: capture.cap]
        link.send({"k": "ready", "init_s": time.perf_counter() - t0, "error": err})
        return
    capture.take()  # drop import-time chatter
    link.send({"k": "ready", "init_s": time.perf_counter() - t0, "error": None})
    _serve(link, capture, runtime, func, int(cfg.get("cpu_guard_s") or 0))


def _load(runtime: str, handler: str, bundle: str) -> Any:
    sys.path.insert(0, bundle)
    os.chdir(bundle)
    if runtime == "python":
        return _load_python(handler)
    path = os.path.join(bundle, handler)
    if not os.access(path, os.X_OK):
        raise PermissionError(f"command {handler!r} is not an executable file")
    return path


def _cpu_guard(guard_s: int) -> None:
    """Plain mode: let this call use at most ``guard_s`` more CPU seconds (SIGXCPU after)."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    used = int(ru.ru_utime + ru.ru_stime) + 1
    resource.setrlimit(resource.RLIMIT_CPU, (used + guard_s, resource.RLIM_INFINITY))


def _serve(link: _Link, capture: _Capture, runtime: str, func: Any, cpu_guard_s: int) -> None:
    while True:
        msg = link.receive()
        if msg is None:
            return
        if msg.get("k") != "invoke":
            raise SystemExit(f"runtime: unexpected frame {msg.get('k')!r}")
        if cpu_guard_s:
            _cpu_guard(cpu_guard_s)
        call_id = msg["id"]
        ctx = Context(link, call_id, msg.get("context") or {})
        ok, value, error = True, None, None
        try:
            if runtime == "python":
                value = func(msg.get("event"), ctx)
            else:
                value = _run_command(func, msg.get("event"), ctx)
        except BaseException as exc:
            ok, error = False, _error(exc)
        out = capture.take()
        if out:
            data = _b64(out)
            link.send({"k": "log", "id": call_id, "stream": "output", "data": data})
        try:
            frame = link.encode({"k": "result", "id": call_id, "ok": ok, "value": value,
                                 "error": error})
        except (TypeError, ValueError, RecursionError) as exc:
            # Not JSON, or too large: the call fails with a clear reason, the runtime lives on.
            what = "is too large" if isinstance(exc, FrameTooLarge) else "is not JSON"
            frame = link.encode({"k": "result", "id": call_id, "ok": False, "value": None,
                                 "error": {
                "type": "ResultError",
                "message": f"the handler's result {what}: {exc}",
            }})
        link.write(frame)


if __name__ == "__main__":
    main()

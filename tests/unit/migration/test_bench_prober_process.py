"""The migration benches' client as a process of its own (``bench/migration/prober.py``):
it reports the first answer of each address as it happens, alternates to the target once
the source fails, tells how each probe failed, and hands every probe back at the stop
(loopback only: two tiny HTTP servers on 127.0.0.1 and 127.0.0.2, same port)."""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import ModuleType

import pytest

_DIR = Path(__file__).resolve().parents[3] / "bench" / "migration"

pytestmark = pytest.mark.timeout(60)


def _load(name: str, file: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, _DIR / file)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


prober = _load("bench_prober_process_mod", "prober.py")


class _Server:
    """Answers every connection with ``HTTP/1.1 404`` until closed."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_server((host, port))
        self.port = self.sock.getsockname()[1]
        self.t = threading.Thread(target=self._serve, daemon=True)
        self.t.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.recv(1024)
                conn.sendall(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")

    def close(self) -> None:
        # shutdown wakes the accept() blocked in the thread (a bare close does not, and
        # the listener would live on until it returns)
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.t.join(5)
        assert not self.t.is_alive()


def test_prober_probe_why_names_the_failed_step() -> None:
    s = _Server("127.0.0.1", 0)
    try:
        assert prober.probe_why("127.0.0.1", s.port, 2.0) == (404, "")
    finally:
        s.close()
    code, why = prober.probe_why("127.0.0.1", s.port, 2.0)
    assert code == 0
    assert why.startswith("connect: ConnectionRefusedError")


def test_prober_process_follows_the_switch_and_returns_every_probe() -> None:
    src = _Server("127.0.0.1", 0)
    dst = _Server("127.0.0.2", src.port)
    proc = subprocess.Popen(
        [sys.executable, "-I", "-S", str(_DIR / "prober.py"), "127.0.0.1", "--port",
         str(src.port)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    try:
        assert proc.stdout.readline().split()[::2] == ["first", "127.0.0.1"]
        proc.stdin.write("target 127.0.0.2\n")
        proc.stdin.flush()
        time.sleep(0.05)  # a few answers from the source, which then goes
        t_gone = time.monotonic()
        src.close()
        first = proc.stdout.readline().split()
        assert first[0] == "first" and first[2] == "127.0.0.2"
        assert float(first[1]) > t_gone  # one clock for both processes
        proc.stdin.write("stop\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == "log\n"
        log = json.loads(proc.stdout.readline())
        assert proc.wait(10) == 0
    finally:
        proc.kill()
        dst.close()
    answered = {a for _t0, _t1, a, code, _why in log if code == 404}
    assert answered == {"127.0.0.1", "127.0.0.2"}
    fails = [why for _t0, _t1, a, code, why in log if code == 0]
    refused = [w for w in fails if w.startswith("connect: ConnectionRefusedError")]
    # a probe the closing listener had queued is reset; every other one is refused
    assert refused and all(w in refused or "ConnectionResetError" in w for w in fails)
    # after the source failed, probes alternate: no two target probes in a row
    after = [a for t0, _t1, a, _c, _w in log if t0 > t_gone]
    assert all(not (a == b == "127.0.0.2") for a, b in itertools.pairwise(after))


def test_prober_slow_run_shows_what_the_client_waited_for() -> None:
    # make bench's per-run list: a run over the target says whether a probe got no
    # answer (the prober's timeout) or the platform was slow (the runner's figure)
    run = _load("bench_prober_process_run", "run.py")
    fast = {"client_downtime_s": 0.12, "runner_downtime_s": 0.07, "slowest_failed_probe_s": 0.01}
    assert run.run_figure(fast) == "120 ms"
    slow = {"client_downtime_s": 0.515, "runner_downtime_s": 0.09, "slowest_failed_probe_s": 0.501}
    assert run.run_figure(slow) == "515 ms (runner 90 ms, slowest failed probe 501 ms)"
    none = {"client_downtime_s": None, "runner_downtime_s": None, "slowest_failed_probe_s": 0.0}
    assert run.run_figure(none) == "-"

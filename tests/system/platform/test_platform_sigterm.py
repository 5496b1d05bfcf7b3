"""`edgevisor up` stopped with SIGTERM (as systemd stops it) exits cleanly: status 0, and
its local agent's cleanup ran (a warm environment's cgroups are gone)."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from edgevisor.testing.controller import free_port

pytestmark = pytest.mark.root

EV = str(Path(sys.executable).with_name("edgevisor"))
CGROUPS = Path("/sys/fs/cgroup/pids/edgevisor")
TASK = {
    "edgevisor.toml": 'name = "noop"\nruntime = "python"\nhandler = "m:h"\nmemory = "64M"\n'
    'cpu = 0.25\n[keep_warm]\nidle = "10m"\n',
    "m.py": "def h(event, context):\n    return event\n",
}


def _bundle() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, text in TASK.items():
            info = tarfile.TarInfo(name)
            info.size = len(text.encode())
            tf.addfile(info, io.BytesIO(text.encode()))
    return buf.getvalue()


def _wait(pred: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if pred():
                return
        except httpx.TransportError:
            pass  # not listening yet
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout_s}s")
        time.sleep(0.05)


def _groups(prefix: str) -> list[str]:
    return [p.name for p in CGROUPS.glob(f"{prefix}-*")] if CGROUPS.exists() else []


def test_sigterm_stops_up_cleanly_and_removes_environments(tmp_path: Path) -> None:
    account = f"sig{os.getpid()}"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEVISOR_")} | {
        "EDGEVISOR_NETWORK__DATAPLANE_MODE": "off",
        "EDGEVISOR_DEVICES__BROKER_PORT": "0",
    }
    log = (tmp_path / "up.log").open("w")
    proc = subprocess.Popen(
        [EV, "up", "--data-dir", str(tmp_path), "--port", str(port), "--host", account],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    try:
        _wait(lambda: (tmp_path / "admin.token").exists(), "admin token")
        token = (tmp_path / "admin.token").read_text().strip()
        h = {"authorization": f"Bearer {token}"}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=h, timeout=30) as c:
            _wait(lambda: any(x["state"] == "up" for x in c.get("/v1/hosts").json()), "host up")
            c.post("/v1/accounts", json={"name": account}).raise_for_status()
            c.post("/v1/tasks", params={"account": account}, content=_bundle()).raise_for_status()
            r = c.post(f"/v1/tasks/noop/invoke?account={account}", content=b'{"x": 1}')
            assert r.status_code == 200 and r.json()["status"] == "succeeded", r.text
        assert _groups(f"{account}-noop"), "a warm environment has its cgroups"
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
        assert rc == 0, (tmp_path / "up.log").read_text()[-2000:]
        assert _groups(f"{account}-noop") == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        for name in _groups(f"{account}-noop"):  # never leave ours behind
            for ctl in ("pids", "memory", "cpu", "freezer"):
                path = CGROUPS.parent.parent / ctl / "edgevisor" / name
                if path.exists():
                    path.rmdir()

"""Benchmark: calls through the real HTTP API of `edgevisor up`, and the agent's idle RSS.

    .venv/bin/python bench/coordinator/api.py [--calls 2000] [--seconds 5]

Starts real processes (`edgevisor up` for the API path; `edgevisor controller` +
`edgevisor agent` for the agent's own RSS), deploys a no-op Python task, warms it, then:

1. Sync invoke latency through the HTTP API (one client, keep-alive), p50/p99, against the
   same client's `GET /healthz` round trip (the HTTP floor) and a raw
   `multiprocessing.Pipe` echo (the IPC floor).
2. Throughput of no-op sync calls with 8 concurrent HTTP callers: 8 threads of one Python
   client (GIL-bound: the client is the limit), and `wrk` (a C load generator, one thread,
   8 connections) when it is installed, with `GET /healthz` under the same load as the
   HTTP floor.
3. Idle RSS of a standalone agent process (coordinator, sandboxes, MQTT broker included).

Prints markdown tables.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing as mp
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path

import httpx

EV = str(Path(sys.executable).with_name("edgevisor"))
NOOP = {
    "edgevisor.toml": 'name = "noop"\nruntime = "python"\nhandler = "m:h"\nmemory = "64M"\n'
    'cpu = 0.25\nconcurrency = 8\n[keep_warm]\nidle = "10m"\n',
    "m.py": "def h(event, context):\n    return event\n",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bundle() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, text in NOOP.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def _echo(conn: Connection) -> None:
    while True:
        msg = conn.recv()
        if msg is None:
            return
        conn.send(msg)


def pipe_floor(n: int) -> list[float]:
    a, b = mp.Pipe()
    p = mp.Process(target=_echo, args=(b,), daemon=True)
    p.start()
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        a.send({"i": i})
        a.recv()
        out.append(time.perf_counter() - t0)
    a.send(None)
    p.join(5)
    return out


def _wait(pred: object, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if pred():  # type: ignore[operator]
                return
        except httpx.TransportError:
            pass  # not listening yet
        if time.monotonic() > deadline:
            raise RuntimeError("timed out")
        time.sleep(0.05)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEVISOR_")}
    # Root namespace: leave its dataplane be; any free port for the MQTT broker.
    return env | {"EDGEVISOR_NETWORK__DATAPLANE_MODE": "off", "EDGEVISOR_DEVICES__BROKER_PORT": "0"}


_WRK_POST = """wrk.method = "POST"
wrk.body = "{}"
wrk.headers["content-type"] = "application/json"
"""


def wrk_rate(url: str, token: str, seconds: float, post: bool, tmp: Path) -> float:
    """Requests/s from ``wrk`` (one thread, 8 connections); any non-2xx answer fails the run."""
    script = tmp / "wrk.lua"
    auth = f'wrk.headers["authorization"] = "Bearer {token}"\n'
    script.write_text(_WRK_POST + auth if post else auth)
    out = subprocess.run(
        ["wrk", "-t1", "-c8", f"-d{max(1, round(seconds))}s", "-s", str(script), url],
        capture_output=True, text=True, check=True, timeout=seconds + 60,
    ).stdout  # fmt: skip
    if "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"wrk saw failed requests:\n{out}")
    m = re.search(r"Requests/sec:\s+([0-9.]+)", out)
    if m is None:
        raise RuntimeError(f"no rate in wrk output:\n{out}")
    return float(m.group(1))


def api_bench(calls: int, seconds: float) -> dict[str, float]:
    tmp = Path(tempfile.mkdtemp(prefix="evbench-"))
    port = _free_port()
    log = open(tmp / "up.log", "w")  # noqa: SIM115
    env = _env() | {"EDGEVISOR_LOG_LEVEL": "warning"}
    proc = subprocess.Popen(
        [EV, "up", "--data-dir", str(tmp), "--port", str(port), "--host", "bench"],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(lambda: (tmp / "admin.token").exists())
        admin = (tmp / "admin.token").read_text().strip()
        h = {"authorization": f"Bearer {admin}"}
        with httpx.Client(base_url=url, headers=h, timeout=30) as c:
            _wait(lambda: any(x["state"] == "up" for x in c.get("/v1/hosts").json()))
            c.post("/v1/accounts", json={"name": "bench"}).raise_for_status()
            c.post("/v1/tasks", params={"account": "bench"}, content=_bundle()).raise_for_status()
            path = "/v1/tasks/noop/invoke?account=bench"
            for _ in range(50):  # warm the environment and the connection
                c.post(path, content=b"{}").raise_for_status()
            health, lat = [], []
            for _ in range(calls):
                t0 = time.perf_counter()
                c.get("/healthz")
                health.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                r = c.post(path, content=b'{"x": 1}')
                lat.append(time.perf_counter() - t0)
                assert r.status_code == 200 and r.json()["status"] == "succeeded", r.text
        done = [0] * 8
        stop = time.monotonic() + seconds

        def caller(i: int) -> None:
            with httpx.Client(base_url=url, headers=h, timeout=30) as cc:
                while time.monotonic() < stop:
                    rr = cc.post(path, content=b"{}")
                    assert rr.status_code == 200, rr.text
                    done[i] += 1

        threads = [threading.Thread(target=caller, args=(i,)) for i in range(8)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - t0
        wrk_invoke = wrk_health = float("nan")
        if shutil.which("wrk"):
            wrk_invoke = wrk_rate(url + path, admin, seconds, True, tmp)
            wrk_health = wrk_rate(url + "/healthz", admin, seconds, False, tmp)
        return {
            "p50": statistics.median(lat), "p99": _pct(lat, 0.99),
            "h50": statistics.median(health), "h99": _pct(health, 0.99),
            "tput": sum(done) / elapsed, "wrk": wrk_invoke, "wrk_health": wrk_health,
        }  # fmt: skip
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def agent_rss() -> float:
    tmp = Path(tempfile.mkdtemp(prefix="evbench-rss-"))
    port = _free_port()
    env = _env() | {"EDGEVISOR_LOG_LEVEL": "warning", "EDGEVISOR_AGENT__LISTEN_PORT": "0"}
    ctl = subprocess.Popen(
        [EV, "controller", "--data-dir", str(tmp / "ctl"), "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )  # fmt: skip
    agent = None
    try:
        _wait(lambda: (tmp / "ctl" / "admin.token").exists())
        time.sleep(0.5)
        admin = (tmp / "ctl" / "admin.token").read_text().strip()
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, headers={"authorization": f"Bearer {admin}"}) as c:
            _wait(lambda: c.get("/healthz").status_code == 200)
            jt = c.post("/v1/hosts/join-tokens", json={"host": "rss"}).json()["secret"]
            agent = subprocess.Popen(
                [EV, "agent", "--controller", url, "--host", "rss", "--join-token", jt,
                 "--data-dir", str(tmp / "agent")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
            )  # fmt: skip
            _wait(lambda: any(x["state"] == "up" for x in c.get("/v1/hosts").json()))
        time.sleep(3)  # idle
        with open(f"/proc/{agent.pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return float("nan")
    finally:
        for p in (agent, ctl):
            if p is not None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    floor = pipe_floor(args.calls)
    r = api_bench(args.calls, args.seconds)
    rss = agent_rss()
    us = 1e6
    print("## Calls through the HTTP API (`edgevisor up`, no-op Python task, warm)\n")
    print("| path | p50 | p99 | ratio of p50 to the floor |")
    print("|---|---:|---:|---:|")
    print(
        f"| `multiprocessing.Pipe` echo (IPC floor) | {statistics.median(floor) * us:.0f} µs "
        f"| {_pct(floor, 0.99) * us:.0f} µs | 1.0x |"
    )
    print(
        f"| HTTP `GET /healthz` (HTTP floor) | {r['h50'] * us:.0f} µs | {r['h99'] * us:.0f} µs "
        f"| {r['h50'] / statistics.median(floor):.1f}x |"
    )
    print(
        f"| HTTP invoke → scheduler → warm environment → result | {r['p50'] * us:.0f} µs "
        f"| {r['p99'] * us:.0f} µs | {r['p50'] / r['h50']:.1f}x of /healthz |"
    )
    print(
        "\nThroughput of no-op sync calls, 8 concurrent callers (target >= 3,000/s; Celery "
        "publishes ~2,000/s):\n"
    )
    print("| load generator | invoke calls/s | `GET /healthz` req/s (HTTP floor) | ratio |")
    print("|---|---:|---:|---:|")
    print(
        f"| 8 threads of one Python httpx client "
        f"| {r['tput']:,.0f} | | |"
    )
    if r["wrk"] == r["wrk"]:
        print(
            f"| `wrk -t1 -c8` (C, same 2 cores as the server) | **{r['wrk']:,.0f}** "
            f"| {r['wrk_health']:,.0f} | {r['wrk'] / r['wrk_health']:.2f} |"
        )
    else:
        print("| `wrk` not installed (`scripts/ensure-system.sh` installs it) | - | - | - |")
    print()
    print(
        f"Idle RSS of a standalone `edgevisor agent`: **{rss:.0f} MiB** (target <= 80 MiB; "
        "the Greengrass v2 nucleus needs 350-400 MB)."
    )


if __name__ == "__main__":
    main()

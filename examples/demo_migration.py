"""Live migration of a stateful domain, with post-switch synchronization (needs root).

Run by ``examples/demo.py`` (``make demo``) or alone: ``sudo .venv/bin/python
examples/demo_migration.py``. A migration needs two hosts and ``edgevisor up`` has one,
so this part builds its own small fleet on this machine and ignores ``EDGEVISOR_URL``:
a controller and two full agents (``edge-a``, ``edge-b``, each with its own data dir and
NBD endpoint on loopback; :mod:`edgevisor.migration.testbed`).

What it shows: the kv example domain on ``edge-a``; a client that keeps writing and
reading; ``domain migrate kv --to edge-b --watch`` (the progress bar; the switch happens
first, the volume syncs after); the switch downtime (the runner's, and the client's: last
answer from the source to first answer from the target); every acknowledged write read
back on the target; the source's copy released. Exit status 0 on success.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

from rich.console import Console

from edgevisor import Client
from edgevisor.cli.migrations import watch
from edgevisor.migration.testbed import http, open_testbed, wait_serving

ROOT = Path(__file__).resolve().parent.parent
KV_APP = ROOT / "examples" / "domains" / "kv"
PY = os.path.realpath(sys.executable)
console = Console()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Client_:
    """Writes ``k<i>`` keys and reads back older ones; records what was acknowledged and
    the gap between the last answer before the switch and the first after it."""

    def __init__(self, acme: Client) -> None:
        self.acme = acme
        self.acked: dict[str, str] = {}
        self.reads_ok = 0
        self.read_mismatch = 0
        self.gap_s = 0.0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        addr = self.acme.get_domain("kv").address
        i, last_ok = 0, time.monotonic()
        while not self.stop.is_set():
            key, val = f"k{i}", f"value-{i}"
            try:
                code, _ = http("PUT", f"http://{addr}:8080/kv/{key}", val.encode(), timeout_s=1)
            except OSError:
                code = 0
            now = time.monotonic()
            if code == 204:
                self.gap_s = max(self.gap_s, now - last_ok)
                last_ok = now
                self.acked[key] = val
                old = f"k{i // 2}"
                try:
                    rc, body = http("GET", f"http://{addr}:8080/kv/{old}", timeout_s=1)
                    if rc == 200 and body.decode() == self.acked.get(old):
                        self.reads_ok += 1
                    else:
                        self.read_mismatch += 1
                except OSError:
                    pass
                i += 1
                time.sleep(0.005)
                continue
            time.sleep(0.001)  # probe again at once: this is the downtime being measured
            with contextlib.suppress(Exception):
                addr = self.acme.get_domain("kv").address  # the domain may have moved


def main() -> int:
    if os.geteuid() != 0:
        console.print("[yellow]demo_migration needs root (namespaces, cgroups, FUSE); skipped[/]")
        return 0
    tag = f"{os.getpid() % 10000}"
    src, dst = f"edge-a{tag}", f"edge-b{tag}"
    root = Path(tempfile.mkdtemp(prefix="edgevisor-migration-demo-"))
    console.rule("[bold]2. Live migration with post-switch synchronization")
    console.print(f"a controller and two hosts ({src}, {dst}) on this machine, data in {root}")
    overrides = {"devices.broker_port": free_port(), "network.dataplane_mode": "off"}
    with open_testbed(root, [], overrides) as tb:
        for h in (src, dst):
            tb.overrides["devices.broker_port"] = free_port()
            tb.start_agent(h)
        tb.admin.create_account("demo")
        with Client(tb.ctl.url, tb.admin.create_token("demo").secret) as c:
            cmd = [PY, "-I", "-S", "/task/kv.py", "--port", "8080"]
            d = c.create_domain("kv", cmd, "256M", app=KV_APP, host=src)
            assert d.address
            wait_serving(d.address)
            console.print(f"domain [bold]kv[/] runs on {d.host} at {d.address}:8080 "
                          f"(256 MiB volume, kv store fsync'd on it)")  # fmt: skip
            for i in range(200):
                http("PUT", f"http://{d.address}:8080/kv/seed{i}", f"seed-{i}".encode())
            client = Client_(c)
            client.thread.start()
            time.sleep(1.0)
            console.print(f"client writing and reading: {len(client.acked)} writes so far")
            console.print(f"$ edgevisor domain migrate kv --to {dst} --rate 64M --watch")
            m = c.migrate_domain("kv", dst, rate_bytes_s=64 << 20)
            m = watch(c, m)
            time.sleep(1.0)
            client.stop.set()
            client.thread.join(10)
            if m.phase != "committed":
                console.print(f"[red]migration ended {m.phase}: {m.reason}[/]")
                return 1
            moved = c.get_domain("kv")
            assert moved.address
            wait_serving(moved.address)
            code, body = http("GET", f"http://{moved.address}:8080/kv", timeout_s=10)
            stored = json.loads(body) if code == 200 else {}
            lost = [k for k, v in client.acked.items() if stored.get(k) != v]
            seeds = [i for i in range(200) if stored.get(f"seed{i}") != f"seed-{i}"]
            vols = tb.agents[src].agent.capability("volumes").list_volumes()
            console.print(
                f"domain now on [bold]{moved.host}[/] at {moved.address}; "
                f"switch downtime {m.downtime_s * 1000 if m.downtime_s else 0:.0f} ms "
                f"(runner), longest pause seen by the client {client.gap_s * 1000:.0f} ms"
            )
            console.print(
                f"client: {len(client.acked)} acknowledged writes, {len(lost)} lost; "
                f"{client.reads_ok} reads matched, {client.read_mismatch} did not; "
                f"seed keys lost: {len(seeds)}"
            )
            console.print(f"volumes left on {src}: {[v['id'] for v in vols] or 'none'}")
            ok = not lost and not seeds and not vols and client.read_mismatch == 0
            c.remove_domain("kv")
    shutil.rmtree(root, ignore_errors=True)
    console.print("[green]migration demo ok[/]" if ok else "[red]migration demo FAILED[/]")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

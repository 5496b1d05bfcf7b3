"""`make demo`: a scripted tour of edgevisor on one machine.

Starts `edgevisor up` on a private data dir and a free port, then walks through each
capability that is wired end to end, printing what happens. Each part is a function; a
part whose pieces are not there yet says so and is skipped.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

import edgevisor
from edgevisor.testing.cgroup_cleanup import remove_empty_groups

ROOT = Path(__file__).resolve().parent.parent
EV = str(Path(sys.executable).with_name("edgevisor"))
console = Console()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.1f} ms"


def part_coordinator(client: edgevisor.Client) -> None:
    console.rule("[bold]1. On-demand code execution")
    info = client.deploy_task(ROOT / "examples" / "tasks" / "hello", account="demo")
    console.print(f"deployed [bold]{info.name}[/] version {info.version[:12]} on {info.hosts}")
    for label, name in (("cold", "edge"), ("warm", "again"), ("warm", "and again")):
        rec = client.invoke("hello", {"name": name}, account="demo")
        console.print(
            f"{label:>4} call: {rec.result['message']!r:<22} queue {ms(rec.queue_wait_s):>9}  "
            f"init {ms(rec.init_s):>9}  run {ms(rec.run_s):>8}"
        )
    accepted = client.invoke_async("hello", {"name": "async"}, account="demo")
    rec = client.get_call(accepted.id, wait_s=30)
    console.print(f"async call {accepted.id}: {rec.status}, logs: {rec.logs.strip()!r}")


def part_script(name: str, url: str, token: str) -> None:
    script = ROOT / "examples" / name
    if not script.exists():
        console.print(f"[dim]{name}: not built yet, skipped[/]")
        return
    env = os.environ | {"EDGEVISOR_URL": url, "EDGEVISOR_TOKEN": token}
    rc = subprocess.run([sys.executable, str(script)], env=env).returncode
    if rc != 0:
        raise SystemExit(f"{name} failed with exit code {rc}")


def main() -> int:
    data = Path(tempfile.mkdtemp(prefix="edgevisor-demo-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    console.print(f"starting [bold]edgevisor up[/] (data dir {data}, API {url})")
    log = open(data / "up.log", "w")  # noqa: SIM115
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEVISOR_")}
    env["EDGEVISOR_DEVICES__BROKER_PORT"] = str(free_port())
    # The demo leaves the root namespace's sysctls and nftables alone; addresses are
    # shown in test namespaces instead.
    env["EDGEVISOR_NETWORK__DATAPLANE_MODE"] = "off"
    proc = subprocess.Popen(
        [EV, "up", "--data-dir", str(data), "--port", str(port), "--host", "demo-host"],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not (data / "admin.token").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"edgevisor up did not start; see {data / 'up.log'}")
            time.sleep(0.1)
        token = (data / "admin.token").read_text().strip()
        with edgevisor.Client(url, token) as client:
            while not any(h.state == "up" for h in client.list_hosts()):
                time.sleep(0.1)
            host = client.list_hosts()[0]
            console.print(
                f"host [bold]{host.name}[/] is {host.state}: {host.cpu_count} CPUs, "
                f"{host.memory_mb} MiB"
            )
            client.create_account("demo")
            part_coordinator(client)
        part_script("demo_devices.py", url, token)
        part_script("demo_migration.py", url, token)
        console.rule("[bold green]demo complete")
        return 0
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        remove_empty_groups()  # the demo's agents are gone: their empty cgroups go too


if __name__ == "__main__":
    raise SystemExit(main())

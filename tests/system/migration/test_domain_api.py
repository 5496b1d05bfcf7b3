"""Domains end to end: SDK/CLI -> controller API -> agent op -> domain runtime (as root)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgevisor import Client, NotFound, RequestError
from edgevisor.agent.local import build_agent
from edgevisor.cli.main import app as cli_app
from edgevisor.errors import AlreadyExists
from edgevisor.settings import load_settings
from edgevisor.storage.hostfs import read_mountinfo
from edgevisor.testing.controller import RunningController, running_controller

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

KV_APP = Path(__file__).resolve().parents[3] / "examples" / "domains" / "kv"
PY = os.path.realpath(sys.executable)
KV_CMD = [PY, "-I", "-S", "/task/kv.py", "--port", "8080"]


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[tuple[RunningController, Client, str]]:
    """A controller with one in-process agent (as `edgevisor up` wires them)."""
    host = f"dom{os.getpid()}"
    with running_controller(tmp_path / "ctl") as ctl:
        admin = Client(ctl.url, ctl.admin_token)
        settings = load_settings(
            overrides={
                "data_dir": str(tmp_path / "agent"),
                "agent.controller_url": ctl.url,
                "agent.host_name": host,
                "agent.heartbeat_interval_s": 0.2,
                "agent.join_token": admin.create_join_token(host=host).secret,
                "storage.nbd.listen_host": "127.0.0.1",
                "storage.nbd.listen_port": 0,
            },
            environ={},
        )
        loop = asyncio.new_event_loop()
        agent = build_agent(settings)
        ready = threading.Event()

        async def main() -> None:
            ctl.state.links.attach_local(host, agent.router)
            ready.set()
            with contextlib.suppress(asyncio.CancelledError):  # how the fixture stops it
                await agent.run(serve_api=False)

        task = loop.create_task(main())
        thread = threading.Thread(target=loop.run_until_complete, args=(task,), daemon=True)
        thread.start()
        ready.wait(10)
        try:
            for _ in range(400):
                if any(h.name == host and h.state == "up" for h in admin.list_hosts()):
                    break
                time.sleep(0.05)
            admin.create_account("acme")
            admin.create_account("other")
            yield ctl, admin, host
        finally:
            loop.call_soon_threadsafe(task.cancel)
            thread.join(60)
            admin.close()
            # the agent stops its domains on the way out: nothing may be left mounted
            left = [m.mount_point for m in read_mountinfo() if str(tmp_path) in m.mount_point]
            assert left == [], left


def _http(method: str, url: str, body: bytes | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method=method)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _wait_serving(address: str, deadline_s: float = 60) -> None:
    end = time.monotonic() + deadline_s
    while True:
        try:
            if _http("GET", f"http://{address}:8080/healthz")[0] == 200:
                return
        except OSError:
            pass
        assert time.monotonic() < end, "kv domain never served"
        time.sleep(0.1)


def test_domain_lifecycle_and_refusals(fleet: tuple[RunningController, Client, str]) -> None:
    ctl, admin, host = fleet
    with (
        Client(ctl.url, admin.create_token("acme").secret) as acme,
        Client(ctl.url, admin.create_token("other").secret) as other,
    ):
        d = acme.create_domain("kv", KV_CMD, "64M", app=KV_APP, restart="on-failure")
        assert (d.name, d.account, d.host, d.phase, d.role) == (
            "kv",
            "acme",
            host,
            "running",
            "primary",
        )
        assert d.address and d.volume_size_bytes == 64 << 20
        assert d.app_digest is not None and len(d.app_digest) == 64  # kept for re-creation
        _wait_serving(d.address)
        base = f"http://{d.address}:8080/kv"
        for i in range(5):
            assert _http("PUT", f"{base}/k{i}", f"v{i}".encode())[0] == 204

        # refusals: duplicate, unknown host, another account's domain, admin without account
        with pytest.raises(AlreadyExists):
            acme.create_domain("kv", KV_CMD, "64M")
        with pytest.raises(NotFound, match="host"):
            acme.create_domain("kv2", KV_CMD, "64M", host="nowhere")
        with pytest.raises(NotFound):
            other.get_domain("kv")
        with pytest.raises(NotFound):
            other.stop_domain("kv")
        with pytest.raises(NotFound):
            other.remove_domain("kv")
        with pytest.raises(RequestError):
            admin.get_domain("kv")
        with pytest.raises(RequestError):
            acme.create_domain("Bad_Name", KV_CMD, "64M")
        assert [x.name for x in other.list_domains()] == []
        assert [x.name for x in acme.list_domains()] == ["kv"]
        assert admin.get_domain("kv", account="acme").phase == "running"

        shown = acme.get_domain("kv")
        assert shown.live is not None and shown.live["pid"]

        stopped = acme.stop_domain("kv")
        assert stopped.phase == "stopped" and stopped.desired == "stopped"
        started = acme.start_domain("kv")
        assert started.phase == "running"
        _wait_serving(d.address)
        assert _http("GET", f"{base}/k3") == (200, b"v3")  # the volume kept it

        # the CLI (SDK only) sees the same
        runner = CliRunner()
        res = runner.invoke(
            cli_app, ["domain", "list", "--json", "--url", ctl.url, "--token", acme.token or ""]
        )
        assert res.exit_code == 0, res.output
        assert [x["name"] for x in json.loads(res.output)] == ["kv"]
        res = runner.invoke(
            cli_app, ["domain", "show", "kv", "--url", ctl.url, "--token", acme.token or ""]
        )
        assert res.exit_code == 0 and "running" in res.output, res.output

        # the README's command line, through the CLI: Debian's python3 inside the domain
        auth = ["--url", ctl.url, "--token", acme.token or ""]
        res = runner.invoke(
            cli_app,
            ["domain", "create", "kvcli", "--app", str(KV_APP), "--volume-size", "16M",
             "--command", "/usr/bin/python3 -I -S /task/kv.py --port 8080", "--json", *auth],
        )  # fmt: skip
        assert res.exit_code == 0, res.output
        made = json.loads(res.output)
        assert made["phase"] == "running" and made["address"] != d.address
        _wait_serving(made["address"])
        res = runner.invoke(cli_app, ["domain", "rm", "kvcli", *auth])
        assert res.exit_code == 0 and "removed" in res.output, res.output

        acme.remove_domain("kv")
        with pytest.raises(NotFound):
            acme.get_domain("kv")
        assert acme.list_domains() == []
        # refused creates left nothing in the store either
        assert [x.name for x in admin.list_domains()] == []


def test_restarts_by_policy_reach_the_store(fleet: tuple[RunningController, Client, str]) -> None:
    ctl, admin, _host = fleet
    with Client(ctl.url, admin.create_token("acme").secret) as acme:
        d = acme.create_domain("crashy", ["/bin/sh", "-c", "sleep 0.2; exit 2"], "16M")
        assert d.restart == "on-failure" and d.app_digest is None
        # list answers from the store only: the background refresh records the restarts
        end = time.monotonic() + 60
        while True:
            (row,) = acme.list_domains()
            if row.restart_count >= 2:
                break
            assert time.monotonic() < end, row
            time.sleep(0.2)
        assert admin.recent_events() and any(
            e.kind == "domain.phase" and e.subject == "crashy" for e in admin.recent_events()
        )
        acme.remove_domain("crashy")

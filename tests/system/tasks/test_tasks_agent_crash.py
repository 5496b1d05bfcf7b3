"""Issue 3, done-when: kill -9 of the agent with 500 async calls accepted; after a restart
every one completes, and keyed calls are not run again."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from edgevisor import AsyncClient, Client
from edgevisor.testing.controller import free_port

pytestmark = pytest.mark.root
EV = str(Path(sys.executable).parent / "edgevisor")
SLOW = {
    "edgevisor.toml": 'name = "slow"\nruntime = "python"\nhandler = "m:h"\nmemory = "48M"\n'
    'cpu = 0.2\nconcurrency = 2\ntimeout = "10s"\n',
    "m.py": "import time\n\ndef h(event, context):\n    time.sleep(0.01)\n    return event\n",
}


def _bundle(files: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _wait(pred: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout_s}s")
        time.sleep(0.1)


def test_kill_9_agent_with_500_async_calls(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEVISOR_")} | {
        "EDGEVISOR_NETWORK__DATAPLANE_MODE": "off",
        "EDGEVISOR_AGENT__LISTEN_PORT": "0",
        "EDGEVISOR_AGENT__HEARTBEAT_INTERVAL_S": "0.3",
        "EDGEVISOR_DEVICES__BROKER_PORT": "0",
    }
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    ctl_log = open(tmp_path / "ctl.log", "w")  # noqa: SIM115
    ctl = subprocess.Popen(
        [EV, "controller", "--data-dir", str(tmp_path / "ctl"), "--port", str(port)],
        stdout=ctl_log, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    procs = [ctl]
    try:
        _wait(lambda: (tmp_path / "ctl" / "admin.token").exists(), "controller")
        admin_token = (tmp_path / "ctl" / "admin.token").read_text().strip()
        admin = Client(url, admin_token)
        _wait(lambda: _healthy(admin), "controller answers")
        admin.create_account("acme")
        jt = admin.create_join_token(host="crashy").secret
        agent_argv = [EV, "agent", "--controller", url, "--host", "crashy",
                      "--data-dir", str(tmp_path / "agent")]  # fmt: skip
        agent = subprocess.Popen(
            [*agent_argv, "--join-token", jt],
            stdout=open(tmp_path / "agent1.log", "w"), stderr=subprocess.STDOUT, env=env,  # noqa: SIM115
        )  # fmt: skip
        procs.append(agent)
        _wait(lambda: _up(admin, "crashy"), "agent up")
        admin.deploy_task(_bundle(SLOW), account="acme")

        async def submit() -> list[tuple[str, str | None]]:
            async with AsyncClient(url, admin_token) as c:
                sem = asyncio.Semaphore(16)

                async def one(i: int) -> tuple[str, str | None]:
                    key = f"key-{i}" if i % 2 == 0 else None
                    async with sem:
                        acc = await c.invoke_async(
                            "slow", {"i": i}, account="acme", idempotency_key=key
                        )
                    return acc.id, key

                return await asyncio.gather(*(one(i) for i in range(500)))

        accepted = asyncio.run(submit())
        assert len({cid for cid, _ in accepted}) == 500
        # Every one of them was acknowledged; now the agent dies without warning.
        agent.send_signal(signal.SIGKILL)
        agent.wait()
        restarted_at = time.time()
        agent = subprocess.Popen(
            agent_argv,  # no join token: its stored credential is enough
            stdout=open(tmp_path / "agent2.log", "w"), stderr=subprocess.STDOUT, env=env,  # noqa: SIM115
        )  # fmt: skip
        procs.append(agent)
        _wait(
            lambda: admin.get_host("crashy").last_heartbeat_at > restarted_at,
            "restarted agent heartbeats",
            timeout_s=90,
        )

        async def collect() -> list[str]:
            async with AsyncClient(url, admin_token, timeout_s=120) as c:
                sem = asyncio.Semaphore(16)

                async def one(cid: str) -> str:
                    async with sem:
                        rec = await c.get_call(cid, wait_s=60)
                    return rec.status

                return await asyncio.gather(*(one(cid) for cid, _ in accepted))

        statuses = asyncio.run(collect())
        assert statuses == ["succeeded"] * 500
        # A keyed call submitted again is the same call: it does not run a second time.
        for cid, key in accepted[:40]:
            if key is None:
                continue
            again = admin.invoke_async("slow", {"again": True}, account="acme", idempotency_key=key)
            assert again.id == cid
        admin.close()
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        ctl_log.close()


def _healthy(c: Client) -> bool:
    try:
        c.health()
        return True
    except Exception:
        return False


def _up(c: Client, host: str) -> bool:
    return any(h.name == host and h.state == "up" for h in c.list_hosts())

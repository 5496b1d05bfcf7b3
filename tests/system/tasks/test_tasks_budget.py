"""Issue 3, done-when: with a host budget that fits one large call, small calls run while
a second large call waits, and it runs once memory frees. Real isolated environments,
through the HTTP API and the SDK."""

from __future__ import annotations

import asyncio
import contextlib
import io
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgevisor import Client
from edgevisor.agent.local import build_agent
from edgevisor.settings import load_settings
from edgevisor.testing.controller import RunningController, running_controller

pytestmark = pytest.mark.root


def _task(name: str, memory: str, sleep_s: float, concurrency: int) -> bytes:
    files = {
        "edgevisor.toml": f'name = "{name}"\nruntime = "python"\nhandler = "m:h"\n'
        f'memory = "{memory}"\ncpu = 0.2\nconcurrency = {concurrency}\ntimeout = "20s"\n',
        "m.py": f"import time\n\ndef h(event, context):\n    time.sleep({sleep_s})\n"
        "    return {'ok': True}\n",
    }
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for n, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(n)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture
def small_host(tmp_path: Path) -> Iterator[tuple[RunningController, Client]]:
    with running_controller(tmp_path / "ctl") as ctl:
        admin = Client(ctl.url, ctl.admin_token)
        settings = load_settings(
            overrides={
                "data_dir": str(tmp_path / "agent"),
                "agent.controller_url": ctl.url,
                "agent.host_name": "tiny",
                "agent.join_token": admin.create_join_token(host="tiny").secret,
                "agent.heartbeat_interval_s": 0.2,
                # Room for one 160 MiB environment and one small one, not two large.
                "coordinator.memory_mb": 220,
                "coordinator.cpu": 2.0,
                "network.dataplane_mode": "off",
                "devices.broker_port": 0,
            },
            environ={},
        )
        loop = asyncio.new_event_loop()
        agent = build_agent(settings)
        ctl.state.links.attach_local("tiny", agent.router)
        task = loop.create_task(agent.run(serve_api=False))
        def run() -> None:
            with contextlib.suppress(asyncio.CancelledError):
                loop.run_until_complete(task)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        try:
            deadline = time.monotonic() + 30
            while not any(h.name == "tiny" and h.state == "up" for h in admin.list_hosts()):
                assert time.monotonic() < deadline
                time.sleep(0.05)
            admin.create_account("acme")
            yield ctl, admin
        finally:
            loop.call_soon_threadsafe(task.cancel)
            thread.join(30)
            admin.close()


def test_small_calls_pass_a_large_call_that_waits_for_memory(
    small_host: tuple[RunningController, Client],
) -> None:
    _ctl, admin = small_host
    admin.deploy_task(_task("big", "160M", 1.5, 2), account="acme")
    admin.deploy_task(_task("small", "32M", 0.05, 1), account="acme")
    big1 = admin.invoke_async("big", {}, account="acme")
    time.sleep(0.3)  # big1 is running and holds 160 of 220 MiB
    big2 = admin.invoke_async("big", {}, account="acme")
    smalls = [admin.invoke_async("small", {"i": i}, account="acme") for i in range(4)]
    recs_small = [admin.get_call(s.id, wait_s=60) for s in smalls]
    r1 = admin.get_call(big1.id, wait_s=60)
    r2 = admin.get_call(big2.id, wait_s=60)
    assert [r.status for r in (r1, r2, *recs_small)] == ["succeeded"] * 6
    assert r1.finished_at is not None and r2.started_at is not None
    # The second large call did not run beside the first (no memory for two) ...
    assert r2.started_at >= r1.finished_at - 0.05
    # ... and the small calls, queued after it, ran while it waited.
    for r in recs_small:
        assert r.started_at is not None and r.started_at < r2.started_at
    assert r2.queue_wait_s is not None and r2.queue_wait_s > 0.5

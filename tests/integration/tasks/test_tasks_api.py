"""Tasks end to end: SDK -> controller API -> agent op -> coordinator -> environment."""

from __future__ import annotations

import asyncio
import contextlib
import io
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgevisor import Client, NotFound, PayloadTooLarge, RequestError
from edgevisor.agent.local import build_agent
from edgevisor.settings import load_settings
from edgevisor.testing.controller import RunningController, running_controller

EXAMPLES = Path(__file__).resolve().parents[3] / "examples" / "tasks"


def _bundle(files: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[tuple[RunningController, Client]]:
    """A controller with one in-process agent (as `edgevisor up` wires them)."""
    with running_controller(tmp_path / "ctl") as ctl:
        settings = load_settings(
            overrides={
                "data_dir": str(tmp_path / "agent"),
                "agent.controller_url": ctl.url,
                "agent.host_name": "local",
                "agent.heartbeat_interval_s": 0.2,
                "coordinator.memory_mb": 512,
                "network.dataplane_mode": "off",  # root namespace: no host dataplane here
                "devices.broker_port": 0,
            },
            environ={},
        )
        admin = Client(ctl.url, ctl.admin_token)
        settings = settings.model_copy(
            update={
                "agent": settings.agent.model_copy(
                    update={"join_token": admin.create_join_token(host="local").secret}
                )
            }
        )
        loop = asyncio.new_event_loop()
        agent = build_agent(settings)
        ready = threading.Event()

        async def main() -> None:
            ctl.state.links.attach_local("local", agent.router)
            ready.set()
            await agent.run(serve_api=False)

        task = loop.create_task(main())
        def run() -> None:
            with contextlib.suppress(asyncio.CancelledError):
                loop.run_until_complete(task)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        ready.wait(10)
        try:
            for _ in range(200):
                if any(h.name == "local" and h.state == "up" for h in admin.list_hosts()):
                    break
                asyncio.run(asyncio.sleep(0.05))
            admin.create_account("acme")
            admin.create_account("other")
            yield ctl, admin
        finally:
            loop.call_soon_threadsafe(task.cancel)
            thread.join(30)
            admin.close()


def _acme(ctl: RunningController, admin: Client) -> Client:
    return Client(ctl.url, admin.create_token("acme").secret)


def test_deploy_invoke_cold_then_warm(fleet: tuple[RunningController, Client]) -> None:
    ctl, admin = fleet
    with _acme(ctl, admin) as acme:
        info = acme.deploy_task(EXAMPLES / "hello")
        assert (info.name, info.account, info.hosts) == ("hello", "acme", ["local"])
        cold = acme.invoke("hello", {"name": "edge"})
        assert cold.ok, cold.error
        assert cold.result["message"] == "Hello, edge!"
        assert "greeting edge" in cold.logs
        warm = acme.invoke("hello", {"name": "again"})
        assert warm.ok
        assert warm.init_s == 0  # reused the warm environment
        assert warm.result["warm_for_s"] >= cold.result["warm_for_s"]
        shown = acme.get_call(warm.id)
        assert shown.id == warm.id and shown.status == "succeeded"
        assert [t.name for t in acme.list_tasks()] == ["hello"]


def test_async_calls_and_idempotency(fleet: tuple[RunningController, Client]) -> None:
    ctl, admin = fleet
    with _acme(ctl, admin) as acme:
        acme.deploy_task(EXAMPLES / "hello")
        accepted = acme.invoke_async("hello", {"name": "later"}, idempotency_key="k1")
        again = acme.invoke_async("hello", {"name": "later"}, idempotency_key="k1")
        assert accepted.id == again.id
        done = acme.get_call(accepted.id, wait_s=30)
        assert done.status == "succeeded"
        assert done.result["message"] == "Hello, later!"


def test_accounts_cannot_see_each_others_tasks(fleet: tuple[RunningController, Client]) -> None:
    ctl, admin = fleet
    with _acme(ctl, admin) as acme, Client(ctl.url, admin.create_token("other").secret) as other:
        acme.deploy_task(EXAMPLES / "hello")
        rec = acme.invoke("hello", {})
        with pytest.raises(NotFound):
            other.invoke("hello", {})
        with pytest.raises(NotFound):
            other.get_call(rec.id)
        assert other.list_tasks() == []
        assert [t.account for t in admin.list_tasks()] == ["acme"]


def test_bad_bundles_are_refused_at_deploy(fleet: tuple[RunningController, Client]) -> None:
    ctl, admin = fleet
    with _acme(ctl, admin) as acme:
        with pytest.raises(RequestError, match="runtime"):
            acme.deploy_task(
                _bundle({"edgevisor.toml": 'name = "x"\nruntime = "cobol"\nhandler = "a:b"\n'})
            )
        with pytest.raises(RequestError, match="handler"):
            acme.deploy_task(
                _bundle(
                    {
                        "edgevisor.toml": 'name = "boom"\nruntime = "python"\nhandler = "m:h"\n',
                        "m.py": "raise ImportError('nope')\n",
                    }
                )
            )
        with pytest.raises(RequestError, match=r"edgevisor\.toml"):
            acme.deploy_task(_bundle({"main.py": "x = 1\n"}))
        with pytest.raises(RequestError, match="memory"):
            acme.deploy_task(EXAMPLES / "hello", memory="-5M")
        assert acme.list_tasks() == []  # nothing half-deployed


def test_handler_errors_and_limits(fleet: tuple[RunningController, Client]) -> None:
    ctl, admin = fleet
    bundle = _bundle(
        {
            "edgevisor.toml": 'name = "err"\nruntime = "python"\nhandler = "m:h"\n',
            "m.py": "def h(event, context):\n    raise ValueError('bad input: ' + str(event))\n",
        }
    )
    with _acme(ctl, admin) as acme:
        acme.deploy_task(bundle)
        rec = acme.invoke("err", {"a": 1})
        assert rec.status == "failed"
        assert rec.error is not None
        assert rec.error["type"] == "ValueError"
        assert "bad input" in rec.error["message"]
        assert "Traceback" in rec.error.get("traceback", "")
        with pytest.raises(PayloadTooLarge):
            acme.invoke("err", {"x": "a" * 2_000_000})
        with pytest.raises(NotFound):
            acme.invoke("missing", {})
        acme.remove_task("err")
        with pytest.raises(NotFound):
            acme.get_task("err")

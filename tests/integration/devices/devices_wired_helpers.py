"""A controller that can be stopped and started again on the same port, an in-process agent
wired as ``edgevisor up`` wires it (tasks + devices), and the mosquitto command-line clients
as devices (sync, for tests that use the sync SDK)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import subprocess
import tarfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import uvicorn

from edgevisor import Client
from edgevisor.agent.daemon import Agent
from edgevisor.agent.local import build_agent
from edgevisor.control.app import create_app
from edgevisor.control.server import ensure_admin_token, open_store
from edgevisor.control.state import ControllerState
from edgevisor.settings import load_settings
from edgevisor.testing.controller import free_port

T = TypeVar("T")

ECHO_TASK = {
    "edgevisor.toml": 'name = "echo"\nruntime = "python"\nhandler = "m:h"\nmemory = "64M"\n',
    "m.py": (
        "def h(event, context):\n"
        "    return {'echo': event.get('payload'), 'source': event.get('source')}\n"
    ),
}


def bundle(files: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def wait_until(cond: Callable[[], Any], timeout_s: float = 60.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout_s} s")
        time.sleep(0.05)


class Controller:
    """A controller on a fixed port over one data dir; ``stop`` and ``start`` again."""

    def __init__(self, data_dir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.settings = load_settings(
            overrides={"data_dir": str(data_dir), "controller.listen_host": "127.0.0.1",
                       "controller.listen_port": self.port},
            environ={},
        )  # fmt: skip
        data_dir.mkdir(parents=True, exist_ok=True)
        self.state: ControllerState | None = None
        self.token = ""
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.on_start: Callable[[ControllerState], None] | None = None

    def start(self) -> None:
        st = ControllerState(settings=self.settings, store=open_store(self.settings))
        self.token = ensure_admin_token(st).read_text().strip()
        if self.on_start is not None:
            self.on_start(st)
        server = uvicorn.Server(uvicorn.Config(
            create_app(st), host="127.0.0.1", port=self.port, log_level="warning", lifespan="on"
        ))  # fmt: skip
        thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
        thread.start()
        wait_until(lambda: server.started or not thread.is_alive(), 30, "controller start")
        if not server.started:
            raise RuntimeError("controller did not start")
        self.state, self._server, self._thread = st, server, thread

    def stop(self) -> None:
        if self._server is None or self._thread is None or self.state is None:
            return
        self._server.should_exit = True
        self._thread.join(timeout=15)
        self.state.store.dispose()
        self._server = self._thread = self.state = None


@dataclass
class Fleet:
    ctl: Controller
    admin: Client
    agent: Agent
    broker_port: int
    tmp: Path
    loop: asyncio.AbstractEventLoop
    clients: list[Client] = field(default_factory=list)

    def on_agent_loop(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the agent's event loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(120)

    def account_client(self, account: str) -> Client:
        c = Client(self.ctl.url, self.admin.create_token(account).secret)
        self.clients.append(c)
        return c

    def host_up(self) -> bool:
        return any(h.name == "local" and h.state == "up" for h in self.admin.list_hosts())


@contextlib.contextmanager
def fleet(tmp: Path, overrides: dict[str, Any] | None = None) -> Iterator[Fleet]:
    """Controller + one in-process agent (host ``local``) with a broker on a free port;
    ``overrides``: more agent settings (dotted names)."""
    ctl = Controller(tmp / "ctl")
    loop = asyncio.new_event_loop()
    agent_box: list[Agent] = []

    def attach(st: ControllerState) -> None:
        if agent_box:
            st.links.attach_local("local", agent_box[0].router)

    ctl.on_start = attach
    ctl.start()
    admin = Client(ctl.url, ctl.token)
    port = free_port()
    settings = load_settings(
        overrides={
            "data_dir": str(tmp / "agent"),
            "agent.controller_url": ctl.url,
            "agent.host_name": "local",
            "agent.heartbeat_interval_s": 0.2,
            "agent.join_token": admin.create_join_token(host="local").secret,
            "coordinator.memory_mb": 512,
            "devices.broker_port": port,
            "devices.spool_retry_interval_s": 0.2,
            **(overrides or {}),
        },
        environ={},
    )
    agent = build_agent(settings)
    agent_box.append(agent)
    assert ctl.state is not None
    ctl.state.links.attach_local("local", agent.router)

    async def main() -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await agent.run(serve_api=False)

    task = loop.create_task(main())
    thread = threading.Thread(target=loop.run_until_complete, args=(task,), daemon=True)
    thread.start()
    f = Fleet(ctl, admin, agent, port, tmp, loop)
    try:
        wait_until(f.host_up, 60, "host up")
        admin.create_account("acme")
        admin.create_account("other")
        yield f
    finally:
        loop.call_soon_threadsafe(task.cancel)
        thread.join(30)
        for c in f.clients:
            c.close()
        admin.close()
        ctl.stop()


# --- mosquitto clients as devices --------------------------------------------------------


def mqtt_pub(port: int, user: str | None, password: str | None, topic: str, message: str,
             ) -> subprocess.CompletedProcess[str]:  # fmt: skip
    args = ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-t", topic, "-m", message,
            "-q", "1"]  # fmt: skip
    if user is not None:
        args += ["-u", user]
    if password is not None:
        args += ["-P", password]
    return subprocess.run(args, capture_output=True, text=True, timeout=30)


class MqttSub:
    """A running ``mosquitto_sub -v``; lines are ``topic payload``."""

    def __init__(self, port: int, user: str, password: str, *topics: str) -> None:
        args = ["stdbuf", "-oL", "mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-d",
                "-v", "-u", user, "-P", password]  # fmt: skip
        for t in topics:
            args += ["-t", t]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)  # fmt: skip
        self.lines: list[str] = []
        self._suback = threading.Event()
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()
        if not self._suback.wait(30):
            self.close()
            raise AssertionError("mosquitto_sub got no SUBACK")

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.rstrip("\n")
            if line.startswith("Subscribed"):
                self._suback.set()
            elif not line.startswith("Client "):
                self.lines.append(line)

    def messages(self, n: int, timeout_s: float = 60.0) -> list[tuple[str, str]]:
        wait_until(lambda: len(self.lines) >= n, timeout_s, f"{n} MQTT messages")
        return [tuple(x.split(" ", 1)) for x in self.lines[:n]]  # type: ignore[misc]

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def __enter__(self) -> MqttSub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

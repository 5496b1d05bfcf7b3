"""The `edgevisor` command as a user runs it: real processes, real ports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgevisor.testing.controller import free_port

EV = str(Path(sys.executable).parent / "edgevisor")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEVISOR_")}
    # Agents here run in the root network namespace: keep the host dataplane (sysctls,
    # nftables) out of it; the system tests exercise it inside test namespaces.
    env["EDGEVISOR_NETWORK__DATAPLANE_MODE"] = "off"
    env["EDGEVISOR_DEVICES__BROKER_PORT"] = "0"  # no clash with other brokers
    env.update(extra)
    return env


def _cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [EV, *args], capture_output=True, text=True, env=env or _env(), timeout=timeout
    )


class Proc:
    def __init__(self, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self.fh = open(log, "w")  # noqa: SIM115
        self.p = subprocess.Popen(argv, stdout=self.fh, stderr=subprocess.STDOUT, env=env)

    def output(self) -> str:
        return self.log.read_text()

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self.fh.close()


def _wait(pred, timeout_s: float = 30.0, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while True:
        if pred():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout_s}s")
        time.sleep(0.1)


@pytest.fixture
def up(tmp_path: Path) -> Iterator[tuple[Proc, str, Path]]:
    port = free_port()
    data = tmp_path / "data"
    env = _env(EDGEVISOR_AGENT__HEARTBEAT_INTERVAL_S="0.5")
    proc = Proc(
        [EV, "up", "--data-dir", str(data), "--port", str(port), "--host", "local"],
        env,
        tmp_path / "up.log",
    )
    try:
        _wait(
            lambda: (data / "admin.token").exists() and "listening" in proc.output(),
            what="up started",
        )
        yield proc, f"http://127.0.0.1:{port}", data
    finally:
        proc.stop()


def _hosts(url: str, data: Path) -> list[dict[str, object]]:
    token = (data / "admin.token").read_text().strip()
    out = _cli("host", "list", "--json", "--url", url, "--token", token)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def test_up_then_host_list_shows_local_host(up: tuple[Proc, str, Path]) -> None:
    proc, url, data = up
    assert "admin token: " + str(data / "admin.token") in proc.output()
    assert (data / "admin.token").stat().st_mode & 0o777 == 0o600
    _wait(
        lambda: any(h["name"] == "local" and h["state"] == "up" for h in _hosts(url, data)),
        what="local host up",
    )
    host = next(h for h in _hosts(url, data) if h["name"] == "local")
    assert int(host["cpu_count"]) >= 1  # type: ignore[call-overload]
    assert int(host["memory_mb"]) > 0  # type: ignore[call-overload]
    token = (data / "admin.token").read_text().strip()
    table = _cli("host", "list", "--url", url, "--token", token)
    assert "local" in table.stdout and "up" in table.stdout


def test_second_up_on_same_data_dir_refuses(up: tuple[Proc, str, Path], tmp_path: Path) -> None:
    _proc, _url, data = up
    out = _cli("up", "--data-dir", str(data), "--port", str(free_port()))
    assert out.returncode == 2
    assert "in use" in out.stderr
    assert "Traceback" not in out.stderr


def test_accounts_and_tokens_from_the_cli(up: tuple[Proc, str, Path]) -> None:
    _proc, url, data = up
    admin = (data / "admin.token").read_text().strip()
    base = ["--url", url]
    assert _cli("account", "create", "acme", *base, "--token", admin).returncode == 0
    out = _cli("token", "create", "--account", "acme", "--json", *base, "--token", admin)
    secret = json.loads(out.stdout)["secret"]
    who = _cli("whoami", "--json", *base, "--token", secret)
    assert json.loads(who.stdout)["account"] == "acme"
    denied = _cli("account", "create", "other", *base, "--token", secret)
    assert denied.returncode == 1
    assert "forbidden" in denied.stderr
    missing = _cli("account", "list", *base, "--token", "evt_bogus")
    assert missing.returncode == 1 and "unauthorized" in missing.stderr


def test_unreachable_store_exits_2_without_traceback(tmp_path: Path) -> None:
    out = _cli(
        "controller",
        "--data-dir",
        str(tmp_path),
        "--port",
        str(free_port()),
        "--store-url",
        f"postgresql+psycopg://u:pw@127.0.0.1:{free_port()}/x",
    )
    assert out.returncode == 2
    assert "unreachable" in out.stderr
    assert "Traceback" not in out.stderr + out.stdout


def test_invalid_config_exits_2_naming_the_field(tmp_path: Path) -> None:
    out = _cli("up", "--data-dir", str(tmp_path), env=_env(EDGEVISOR_CONTROLLER__LISTEN_PORT="-5"))
    assert out.returncode == 2
    assert "controller.listen_port" in out.stderr
    shown = _cli("config", "show", "--json")
    assert shown.returncode == 0
    assert json.loads(shown.stdout)["controller.listen_port"] == 7450


def test_agent_survives_controller_loss_and_rejoins_without_join_token(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cdata = tmp_path / "ctl"
    fast = _env(
        EDGEVISOR_CONTROLLER__HEARTBEAT_TIMEOUT_S="2",
        EDGEVISOR_CONTROLLER__RECONCILE_INTERVAL_S="0.2",
        EDGEVISOR_AGENT__HEARTBEAT_INTERVAL_S="0.3",
        EDGEVISOR_AGENT__LISTEN_PORT="0",
    )
    ctl_argv = [EV, "controller", "--data-dir", str(cdata), "--port", str(port)]
    ctl = Proc(ctl_argv, fast, tmp_path / "ctl1.log")
    agent: Proc | None = None
    try:
        _wait(
            lambda: (cdata / "admin.token").exists() and "listening" in ctl.output(),
            what="controller",
        )
        admin = (cdata / "admin.token").read_text().strip()
        jt = _cli(
            "host", "join-token", "--host", "edge1", "--url", url, "--token", admin
        ).stdout.strip()
        agent = Proc(
            [
                EV,
                "agent",
                "--controller",
                url,
                "--host",
                "edge1",
                "--join-token",
                jt,
                "--data-dir",
                str(tmp_path / "agent"),
            ],
            fast,
            tmp_path / "agent.log",
        )
        _wait(
            lambda: any(h["name"] == "edge1" and h["state"] == "up" for h in _hosts(url, cdata)),
            what="edge1 up",
        )
        ctl.stop()
        time.sleep(1.5)
        assert agent.p.poll() is None, "agent must keep running without its controller"
        ctl = Proc(ctl_argv, fast, tmp_path / "ctl2.log")
        _wait(lambda: "listening" in ctl.output(), what="controller restart")
        # Marked down while nobody heard from it, then up again on the next heartbeat.
        _wait(
            lambda: any(h["name"] == "edge1" and h["state"] == "up" for h in _hosts(url, cdata)),
            what="edge1 back",
        )
        agent.stop()
        _wait(
            lambda: any(h["name"] == "edge1" and h["state"] == "down" for h in _hosts(url, cdata)),
            what="edge1 down",
        )
        # Restart of the agent: no join token needed, the stored credential is enough.
        agent = Proc(
            [
                EV,
                "agent",
                "--controller",
                url,
                "--host",
                "edge1",
                "--data-dir",
                str(tmp_path / "agent"),
            ],
            fast,
            tmp_path / "agent2.log",
        )
        _wait(
            lambda: any(h["name"] == "edge1" and h["state"] == "up" for h in _hosts(url, cdata)),
            what="edge1 up again",
        )
    finally:
        if agent is not None:
            agent.stop()
        ctl.stop()

"""Volumes end to end: SDK/CLI -> controller API -> agent op -> volumes capability; PKI at join."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgevisor import Client, NotFound, RequestError
from edgevisor.agent.daemon import Agent
from edgevisor.agent.volumes import VolumesCapability
from edgevisor.cli.main import app as cli_app
from edgevisor.errors import AlreadyExists, Forbidden, Unauthorized
from edgevisor.pki import certificate_cn
from edgevisor.settings import load_settings
from edgevisor.testing.controller import RunningController, running_controller

MiB = 1 << 20


@dataclass
class Fleet:
    ctl: RunningController
    admin: Client
    agents: dict[str, tuple[Agent, VolumesCapability, asyncio.AbstractEventLoop]]

    def run(self, host: str, coro: object) -> object:
        loop = self.agents[host][2]
        return asyncio.run_coroutine_threadsafe(coro, loop).result(60)  # type: ignore[arg-type]


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    """A controller and two in-process agents ("a", "b") running the volumes capability."""
    with running_controller(tmp_path / "ctl") as ctl:
        admin = Client(ctl.url, ctl.admin_token)
        agents: dict[str, tuple[Agent, VolumesCapability, asyncio.AbstractEventLoop]] = {}
        stops: list[tuple[asyncio.AbstractEventLoop, asyncio.Task[None], threading.Thread]] = []
        try:
            for host in ("a", "b"):
                settings = load_settings(
                    overrides={
                        "data_dir": str(tmp_path / host),
                        "agent.controller_url": ctl.url,
                        "agent.host_name": host,
                        "agent.heartbeat_interval_s": 0.2,
                        "agent.join_token": admin.create_join_token(host=host).secret,
                    },
                    environ={},
                )
                agent = Agent(settings)
                cap = VolumesCapability(settings)
                agent.add(cap)
                loop = asyncio.new_event_loop()

                async def main(agent: Agent = agent, host: str = host) -> None:
                    ctl.state.links.attach_local(host, agent.router)
                    with contextlib.suppress(asyncio.CancelledError):
                        await agent.run(serve_api=False)

                task = loop.create_task(main())
                th = threading.Thread(target=loop.run_until_complete, args=(task,), daemon=True)
                th.start()
                stops.append((loop, task, th))
                agents[host] = (agent, cap, loop)
            for _ in range(400):
                up = {h.name for h in admin.list_hosts() if h.state == "up"}
                certs = all(c.server and c.server.ssl_context for _, c, _ in agents.values())
                if up >= {"a", "b"} and certs:
                    break
                asyncio.run(asyncio.sleep(0.05))
            admin.create_account("acme")
            admin.create_account("other")
            yield Fleet(ctl, admin, agents)
        finally:
            for loop, task, _th in stops:
                loop.call_soon_threadsafe(task.cancel)
            for _loop, _task, th in stops:
                th.join(30)
            admin.close()


def _client(f: Fleet, account: str) -> Client:
    return Client(f.ctl.url, f.admin.create_token(account).secret)


def test_join_issues_host_certificates_and_the_ca_key_is_private(fleet: Fleet) -> None:
    ca_key = fleet.ctl.settings.data_dir / "pki" / "ca.key"
    assert stat.S_IMODE(os.stat(ca_key).st_mode) == 0o600
    for host, (agent, cap, _loop) in fleet.agents.items():
        ident = cap.identity
        assert ident is not None and ident.ready
        assert ident.key_path.parent == agent.dir / "pki"
        assert certificate_cn(ident.cert_path.read_bytes()) == host
        assert stat.S_IMODE(os.stat(ident.key_path).st_mode) == 0o600


def test_a_host_that_joined_before_pki_asks_for_its_certificate(fleet: Fleet) -> None:
    agent, cap, _loop = fleet.agents["b"]
    assert cap.identity is not None
    shutil.rmtree(cap.identity.dir)  # as if b joined before hosts had certificates
    assert not cap.identity.ready
    fleet.run("b", cap.connected())
    assert cap.identity.ready and certificate_cn(cap.identity.cert_path.read_bytes()) == "b"
    # the endpoint is host-authenticated and names only the caller's own host
    with pytest.raises(Forbidden):
        fleet.run("b", agent.request("POST", "/v1/hosts/a/certificate",
                                     {"csr_pem": cap.identity.csr_pem()}))  # fmt: skip
    with pytest.raises(Unauthorized):
        fleet.admin.call(  # the admin token is not a host credential
            _post("/v1/hosts/a/certificate", {"csr_pem": cap.identity.csr_pem()})
        )
    with pytest.raises(RequestError):
        fleet.run("b", agent.request("POST", "/v1/hosts/b/certificate", {"csr_pem": "junk"}))


def _post(path: str, body: object) -> object:
    from edgevisor.sdk.calls import Call, _none

    return Call("POST", path, _none, json=body)


def test_volume_lifecycle(fleet: Fleet) -> None:
    with _client(fleet, "acme") as acme:
        v = acme.create_volume("data", "16M", host="a")
        assert (v.name, v.account, v.host, v.size_bytes) == ("data", "acme", "a", 16 * MiB)
        assert v.live is not None and v.live["present_bytes"] == 16 * MiB
        assert [x.name for x in acme.list_volumes()] == ["data"]
        ep = acme.export_volume("data", to="b")
        assert ep.uri == f"nbds://{ep.address}:{ep.port}/acme.data" and ep.peer == "b"
        assert acme.get_volume("data").exported_to == "b"
        # b can open it with its fleet certificate; a lazy copy there matches
        _agent, cap_b, _loop = fleet.agents["b"]
        source = {"host": ep.host, "address": ep.address, "port": ep.port, "export": ep.export}
        fleet.run("b", cap_b.create_lazy("copy", 16 * MiB, account="acme", source=source))
        fleet.run("b", cap_b.wait_filled("acme.copy", 60))
        _a, cap_a, _l = fleet.agents["a"]
        assert fleet.run("b", cap_b.checksum("acme.copy")) == fleet.run(
            "a", cap_a.checksum("acme.data")
        )
        acme.unexport_volume("data")
        assert acme.get_volume("data").exported_to is None
        acme.remove_volume("data")
        assert acme.list_volumes() == []
        assert fleet.run("a", _ids(cap_a)) == []


async def _ids(cap: VolumesCapability) -> list[str]:
    return [v["id"] for v in cap.list_volumes()]


def test_refusals(fleet: Fleet) -> None:
    with _client(fleet, "acme") as acme, _client(fleet, "other") as other:
        for bad in ("lots", "0", "-1G", "1000", "1.5G"):
            with pytest.raises(RequestError):
                acme.create_volume("v", bad)
        with pytest.raises(RequestError):
            acme.create_volume("Bad Name", "1M")
        with pytest.raises(NotFound):
            acme.create_volume("v", "1M", host="nowhere")
        acme.create_volume("v", "1M", host="a")
        with pytest.raises(AlreadyExists):
            acme.create_volume("v", "1M", host="b")
        # another account's volume does not exist for this one
        for call in (
            lambda: other.get_volume("v"),
            lambda: other.remove_volume("v"),
            lambda: other.export_volume("v", to="b"),
            lambda: other.get_volume("v", account="acme"),
        ):
            with pytest.raises(NotFound):
                call()
        assert other.list_volumes() == []
        other.create_volume("v", "2M")  # its own volume of the same name
        with pytest.raises(NotFound):
            acme.export_volume("v", to="nowhere")
        with pytest.raises(RequestError):
            acme.export_volume("v", to="a")  # the volume's own host
        with pytest.raises(RequestError):  # the admin must name the account
            fleet.admin.create_volume("w", "1M")
        names = sorted((v.account, v.name) for v in fleet.admin.list_volumes())
        assert names == [("acme", "v"), ("other", "v")]


def test_cli(fleet: Fleet) -> None:
    token = fleet.admin.create_token("acme").secret
    env = {"EDGEVISOR_URL": fleet.ctl.url, "EDGEVISOR_TOKEN": token}
    runner = CliRunner()
    r = runner.invoke(cli_app, ["volume", "create", "logs", "--size", "8M", "--host", "a",
                                "--json"], env=env)  # fmt: skip
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["size_bytes"] == 8 * MiB
    r = runner.invoke(cli_app, ["volume", "export", "logs", "--to", "b"], env=env)
    assert r.exit_code == 0, r.output
    assert r.output.strip().startswith("nbds://") and r.output.strip().endswith("/acme.logs")
    r = runner.invoke(cli_app, ["volume", "list"], env=env)
    assert r.exit_code == 0 and "logs" in r.output
    r = runner.invoke(cli_app, ["volume", "create", "x", "--size", "huge"], env=env)
    assert r.exit_code != 0 and "size" in r.output
    r = runner.invoke(cli_app, ["volume", "rm", "logs"], env=env)
    assert r.exit_code == 0, r.output
    r = runner.invoke(cli_app, ["volume", "list", "--json"], env=env)
    assert json.loads(r.output) == []


def test_a_volume_on_a_removed_host_can_still_be_removed(fleet: Fleet) -> None:
    with _client(fleet, "acme") as acme:
        acme.create_volume("gone", "1M", host="b")
        fleet.admin.remove_host("b")
        acme.remove_volume("gone")
        assert acme.list_volumes() == []

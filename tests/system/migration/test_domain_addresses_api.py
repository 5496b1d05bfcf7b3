"""Domains with logical addresses through the API, one in-process agent (as root).

The controller is on loopback here (as with ``edgevisor up``), so the host runs no
translation dataplane: the domain's namespace still holds its logical address and the
host routes to it in its main table (the fallback), which is what this test reaches it
by. The translation between hosts is the 3-host test's (``test_domain_addresses_fleet``).
Covers: create with a network (any / a given address), ``show``, bad input refused with
nothing changed, ``rm`` preserving by default, a claim by a new domain (another
account's refused), ``rm --release``, and a failed create giving the address back.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
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
from edgevisor.errors import Conflict, EdgevisorError, Forbidden
from edgevisor.network.netns import netns_exists
from edgevisor.settings import load_settings
from edgevisor.storage.hostfs import read_mountinfo
from edgevisor.testing.controller import RunningController, running_controller

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

KV_APP = Path(__file__).resolve().parents[3] / "examples" / "domains" / "kv"
PY = os.path.realpath(sys.executable)
KV_CMD = [PY, "-I", "-S", "/task/kv.py", "--port", "8080"]
# Benchmark-test ranges (RFC 2544): nothing on a real network uses them.
NET = "198.18.211.0/28"
OTHER_NET = "198.18.212.0/28"
PHYS = "198.19.211.0/28"

Fleet = tuple[RunningController, Client, str]


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    """A controller with one in-process agent (as `edgevisor up` wires them)."""
    host = f"dna{os.getpid()}"
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
            with contextlib.suppress(asyncio.CancelledError):  # the fixture's way to stop it
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
            for acct, cidr in (("acme", NET), ("other", OTHER_NET)):
                admin.create_account(acct)
                admin.create_network("net", cidr, account=acct)
            admin.create_physical_pool(PHYS)
            yield ctl, admin, host
        finally:
            loop.call_soon_threadsafe(task.cancel)
            thread.join(60)
            admin.close()
            left = [m.mount_point for m in read_mountinfo() if str(tmp_path) in m.mount_point]
            assert left == [], left


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def _wait_serving(address: str, deadline_s: float = 60) -> None:
    end = time.monotonic() + deadline_s
    while True:
        try:
            if _get(f"http://{address}:8080/healthz") == 200:
                return
        except OSError:
            pass
        assert time.monotonic() < end, f"kv domain at {address} never served"
        time.sleep(0.1)


def _state(admin: Client, account: str) -> tuple[list[tuple[str, str, str | None]], list[str]]:
    """(records of the account, domain names of the account): what must not change."""
    recs = [(r.logical, str(r.state), r.instance) for r in admin.list_addresses(account=account)]
    return recs, sorted(d.name for d in admin.list_domains() if d.account == account)


def test_domain_logical_address_lifecycle(fleet: Fleet) -> None:
    ctl, admin, host = fleet
    with (
        Client(ctl.url, admin.create_token("acme").secret) as acme,
        Client(ctl.url, admin.create_token("other").secret) as other,
    ):
        # A specific address of the account's network.
        d = acme.create_domain("kv", KV_CMD, "32M", app=KV_APP, network="net",
                               address="198.18.211.5")  # fmt: skip
        assert (d.address, d.network, d.phase) == ("198.18.211.5", "net", "running")
        rec = admin.get_address("198.18.211.5", account="acme")
        assert (rec.state, rec.host, rec.instance) == ("bound", host, "domain:acme.kv")
        assert d.address_record_id == rec.id
        shown = acme.get_domain("kv")
        assert shown.address == "198.18.211.5" and shown.live is not None
        assert shown.live["address"] == "198.18.211.5"  # what the domain's namespace holds
        netns = str(shown.live["netns"])
        assert netns_exists(netns)
        _wait_serving("198.18.211.5")

        # Bad input: refused before anything changes.
        before = _state(admin, "acme")
        bad: list[tuple[dict[str, str], type[EdgevisorError]]] = [
            ({"network": "nope"}, NotFound),  # unknown network
            ({"network": "net", "address": "198.18.99.1"}, RequestError),  # outside it
            ({"network": "net", "address": "198.18.211.5"}, Conflict),  # taken
            ({"claim": "198.18.211.5"}, Conflict),  # bound, not preserved
            ({"claim": "198.18.212.3"}, NotFound),  # not the account's
        ]
        for opts, err in bad:
            with pytest.raises(err):
                acme.create_domain("kv2", KV_CMD, "32M", app=KV_APP, **opts)
            assert _state(admin, "acme") == before, opts
        with pytest.raises(RequestError):  # an address without its network
            acme.create_domain("kv2", KV_CMD, "32M", address="198.18.211.6")

        # rm preserves by default; the namespace is gone, the address stays the account's.
        acme.remove_domain("kv")
        rec = admin.get_address("198.18.211.5", account="acme")
        assert (rec.state, rec.host, rec.instance) == ("preserved", None, None)
        assert not netns_exists(netns)

        # Another account cannot claim it (by address: not its own; by id: forbidden).
        other_before = _state(admin, "other")
        with pytest.raises(NotFound):
            other.create_domain("x", KV_CMD, "32M", claim="198.18.211.5")
        with pytest.raises(Forbidden):
            other.create_domain("x", KV_CMD, "32M", claim=str(rec.id))
        assert _state(admin, "other") == other_before

        # A new domain of acme claims it and is reached at the same address.
        runner = CliRunner()
        res = runner.invoke(cli_app, [
            "domain", "create", "kv3", "--command", " ".join(KV_CMD), "--volume-size", "32M",
            "--app", str(KV_APP), "--claim", "198.18.211.5",
            "--url", ctl.url, "--token", admin.create_token("acme").secret,
        ])  # fmt: skip
        assert res.exit_code == 0, res.output
        assert "198.18.211.5" in res.output
        d3 = acme.get_domain("kv3")
        assert (d3.address, d3.network) == ("198.18.211.5", "net")
        rec = admin.get_address("198.18.211.5", account="acme")
        assert (rec.state, rec.host, rec.instance) == ("bound", host, "domain:acme.kv3")
        _wait_serving("198.18.211.5")

        # Any free address; then rm --release returns it to the pool.
        d4 = acme.create_domain("kv4", KV_CMD, "32M", app=KV_APP, network="net")
        assert d4.address is not None
        assert ipaddress.ip_address(d4.address) in ipaddress.ip_network(NET)
        assert d4.address != "198.18.211.5"
        res = runner.invoke(cli_app, [
            "domain", "rm", "kv4", "--release",
            "--url", ctl.url, "--token", admin.create_token("acme").secret,
        ])  # fmt: skip
        assert res.exit_code == 0, res.output
        assert d4.address not in {r.logical for r in admin.list_addresses(account="acme")
                                  if r.state != "held"}  # fmt: skip
        events = [h.event for h in admin.address_history(d4.address, account="acme")]
        assert events[:3] == ["allocate", "bind", "release"]

        acme.remove_domain("kv3", release=True)


def test_failed_create_gives_the_address_back(fleet: Fleet) -> None:
    """The host refuses the domain (an app archive it cannot unpack): no domain, no record
    left; a claimed address goes back to preserved."""
    ctl, admin, _host = fleet
    with Client(ctl.url, admin.create_token("acme").secret) as acme:
        before = _state(admin, "acme")
        with pytest.raises(EdgevisorError):
            acme.create_domain("bad", KV_CMD, "16M", app=b"not a tar.gz", network="net",
                               address="198.18.211.9")  # fmt: skip
        recs, names = _state(admin, "acme")
        assert names == before[1]
        assert "198.18.211.9" not in {r[0] for r in recs if r[1] != "held"}
        admin.allocate_address("net", "198.18.211.9", account="acme")  # free again

        d = acme.create_domain("kv", KV_CMD, "16M", app=KV_APP, network="net")
        acme.remove_domain("kv")  # preserved
        with pytest.raises(EdgevisorError):
            acme.create_domain("bad", KV_CMD, "16M", app=b"not a tar.gz", claim=str(d.address))
        assert admin.get_address(str(d.address), account="acme").state == "preserved"

"""The address-record side of domains (``control.domain_net``) against a real controller:
refusals that change nothing, the migration's idempotent move, preserve/release on rm,
and giving an address back after a failed create. Hosts are joined without agents, so
pushes find nobody to apply them (the reconciler's business); records are what is checked.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from edgevisor import Client
from edgevisor.control import domain_net
from edgevisor.control.domain_net import AddressRequest
from edgevisor.errors import Conflict, Forbidden, NotFound, RequestError
from edgevisor.testing.controller import RunningController, running_controller

CAP = {"cpu_count": 1, "memory_mb": 64, "disk_mb": 64}


@pytest.fixture
def ctl(tmp_path: Path) -> Iterator[RunningController]:
    with running_controller(tmp_path / "ctl", {"network.hold_down_s": 30.0}) as c:
        admin = Client(c.url, c.admin_token)
        for host in ("h1", "h2"):
            jt = admin.create_join_token(host=host).secret
            r = httpx.post(f"{c.url}/v1/hosts/join",
                           json={"name": host, "join_token": jt, "capacity": CAP})  # fmt: skip
            r.raise_for_status()
        for acct in ("acme", "other"):
            admin.create_account(acct)
            admin.create_network("net", "10.9.0.0/28", account=acct)
        admin.create_network("six", "fd00:9::/120", account="acme")
        admin.create_network("theirs", "10.9.1.0/28", account="other")
        admin.create_physical_pool("10.250.9.0/28")
        admin.close()
        yield c


def _records(ctl: RunningController, account: str) -> list[tuple[str, str, str | None, int]]:
    with Client(ctl.url, ctl.admin_token) as admin:
        return [(r.logical, str(r.state), r.host, r.generation)
                for r in admin.list_addresses(account=account)]  # fmt: skip


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_reserve_refusals_change_nothing(ctl: RunningController) -> None:
    st = ctl.state
    rec = _run(domain_net.reserve(st, "other", AddressRequest(network="net"), host="h1",
                                  instance="domain:other.x"))  # fmt: skip
    before = _records(ctl, "acme"), _records(ctl, "other")
    bad: list[tuple[AddressRequest, str, type[Exception]]] = [
        (AddressRequest(network="nope"), "h1", NotFound),
        (AddressRequest(network="theirs"), "h1", NotFound),  # another account's network
        (AddressRequest(network="net", address="10.9.1.1"), "h1", RequestError),
        (AddressRequest(network="six"), "h1", RequestError),  # domains take IPv4
        (AddressRequest(claim=str(rec.id)), "h1", Forbidden),  # another account's
        (AddressRequest(claim=rec.logical), "h1", NotFound),  # not acme's address
        (AddressRequest(network="net"), "no-such-host", NotFound),
    ]
    for req, host, err in bad:
        with pytest.raises(err):
            _run(domain_net.reserve(st, "acme", req, host=host, instance="domain:acme.d"))
        assert (_records(ctl, "acme"), _records(ctl, "other")) == before, req
    with pytest.raises(RequestError):
        AddressRequest(address="10.9.0.3")  # an address needs its network
    with pytest.raises(RequestError):
        AddressRequest(network="net", address="10.9.0.3", claim="10.9.0.4")


def test_move_is_idempotent_and_fenced_by_generation(ctl: RunningController) -> None:
    st = ctl.state
    rec = _run(domain_net.reserve(st, "acme", AddressRequest(network="net", address="10.9.0.5"),
                                  host="h1", instance="domain:acme.d"))  # fmt: skip
    assert (rec.state.value, rec.host, rec.instance) == ("bound", "h1", "domain:acme.d")
    moved = _run(domain_net.move_record(st, "acme", rec.id, "h2"))
    assert moved is not None and moved.host == "h2" and moved.generation == rec.generation + 1
    assert moved.physical != rec.physical
    # A retried move (lost answer) or the undo of a move that never happened: no change.
    assert _run(domain_net.move_record(st, "acme", rec.id, "h2")) is None
    assert _records(ctl, "acme") == [("10.9.0.5", "bound", "h2", moved.generation)]
    back = _run(domain_net.move_record(st, "acme", rec.id, "h1"))
    assert back is not None and back.host == "h1"
    with pytest.raises(NotFound):
        _run(domain_net.move_record(st, "acme", rec.id, "no-such-host"))

    # rm: preserve (twice is harmless), then a claim by another domain, then release.
    _run(domain_net.let_go(st, "acme", rec.id, release=False))
    _run(domain_net.let_go(st, "acme", rec.id, release=False))
    assert _records(ctl, "acme")[0][:3] == ("10.9.0.5", "preserved", None)
    with pytest.raises(Conflict):  # a preserved address cannot be moved
        _run(domain_net.move_record(st, "acme", rec.id, "h2"))
    got = _run(domain_net.reserve(st, "acme", AddressRequest(claim="10.9.0.5"), host="h2",
                                  instance="domain:acme.e"))  # fmt: skip
    assert (got.id, got.host, got.instance) == (rec.id, "h2", "domain:acme.e")
    _run(domain_net.let_go(st, "acme", rec.id, release=True))
    assert _records(ctl, "acme")[0][:2] == ("10.9.0.5", "held")  # the hold-down
    _run(domain_net.let_go(st, "acme", rec.id, release=True))  # gone already: no error


def test_undo_after_a_failed_create(ctl: RunningController) -> None:
    st = ctl.state
    fresh = _run(domain_net.reserve(st, "acme", AddressRequest(network="net", address="10.9.0.7"),
                                    host="h1", instance="domain:acme.f"))  # fmt: skip
    _run(domain_net.undo_reserve(st, "acme", fresh.id, claimed=False))
    assert _records(ctl, "acme") == []  # released at once, no hold-down: nobody used it
    again = _run(domain_net.reserve(st, "acme", AddressRequest(network="net", address="10.9.0.7"),
                                    host="h1", instance="domain:acme.f"))  # fmt: skip
    _run(domain_net.let_go(st, "acme", again.id, release=False))
    claimed = _run(domain_net.reserve(st, "acme", AddressRequest(claim="10.9.0.7"), host="h2",
                                      instance="domain:acme.g"))  # fmt: skip
    _run(domain_net.undo_reserve(st, "acme", claimed.id, claimed=True))
    assert _records(ctl, "acme")[0][:3] == ("10.9.0.7", "preserved", None)

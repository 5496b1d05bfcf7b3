"""Pushes use the agent endpoints resolved in the change's transaction."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest

from edgevisor.control import addr_sync
from edgevisor.network.lifecycle import State
from edgevisor.network.records import AddressRecord

NOW = datetime(2026, 1, 1, tzinfo=UTC)
REC = AddressRecord(id=7, account="acme", network_id=1, logical="10.0.0.7",
                    physical="192.168.0.9", host="h2", instance="i", state=State.BOUND,
                    generation=4, held_until=None, created_at=NOW, updated_at=NOW)


class _Links:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    async def call(self, host: str, op: str, payload: dict[str, Any], *,
                   timeout_s: float | None = None,
                   endpoint: tuple[str, str] | None = None) -> Any:
        self.calls.append((host, endpoint))
        return {"reports": [{"record_id": 7, "generation": 4, "error": None}]}


class _Net:
    push_timeout_s = 5.0


class _Settings:
    network = _Net()


class _State:
    def __init__(self) -> None:
        self.links = _Links()
        self.settings = _Settings()


def test_an_unreachable_endpoint_is_reported_without_a_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stored: list[list[tuple[str, Any]]] = []

    class _Writer:
        def add(self, got: list[tuple[str, Any]]) -> None:
            stored.append(list(got))

    monkeypatch.setattr(addr_sync, "report_writer", lambda _st: _Writer())
    st = _State()
    hosts = {"h1", "h2", "h3"}  # in both sets: each gets the one-record delta
    change = addr_sync.Push(REC, hosts, set(hosts), first="h1")
    change.endpoints = {"h1": ("http://h1:7451", "k1"), "h2": "host 'h2' is down",
                        "h3": ("http://h3:7451", "k3")}
    asyncio.run(addr_sync.push(st, change))  # type: ignore[arg-type]
    assert change.results == {"h1": "ok", "h2": "host 'h2' is down", "h3": "ok"}
    # The old host first (fencing), each call with the endpoint resolved beforehand.
    assert st.links.calls[0] == ("h1", ("http://h1:7451", "k1"))
    assert sorted(st.links.calls[1:]) == [("h3", ("http://h3:7451", "k3"))]
    assert [sorted(h for h, _ in got) for got in stored] == [["h1", "h3"]]


def test_reports_are_stored_in_order_one_transaction_per_burst(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    batches: list[list[tuple[str, Any]]] = []

    async def store(_st: Any, _fn: Any, got: list[tuple[str, Any]]) -> None:
        batches.append(list(got))

    monkeypatch.setattr(addr_sync, "in_store", store)

    async def scenario() -> None:
        w = addr_sync.ReportWriter(_State())  # type: ignore[arg-type]
        w.add([("h1", {"n": 1})])
        w.add([("h2", {"n": 2}), ("h1", {"n": 3})])
        assert batches == []  # not on the caller's path
        await w.flush()
        w.add([("h2", {"n": 4})])
        await w.flush()

    asyncio.run(scenario())
    assert batches == [[("h1", {"n": 1}), ("h2", {"n": 2}), ("h1", {"n": 3})],
                       [("h2", {"n": 4})]]


def test_a_drain_of_a_finished_event_loop_is_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    batches: list[list[tuple[str, Any]]] = []

    async def store(_st: Any, _fn: Any, got: list[tuple[str, Any]]) -> None:
        batches.append(list(got))

    monkeypatch.setattr(addr_sync, "in_store", store)
    w = addr_sync.ReportWriter(_State())  # type: ignore[arg-type]

    async def add_only() -> None:
        w.add([("h1", {"n": 1})])  # the loop ends before the drain stores it

    asyncio.run(add_only())

    async def add_and_flush() -> None:
        w.add([("h1", {"n": 2})])
        await w.flush()

    asyncio.run(add_and_flush())
    assert batches == [[("h1", {"n": 1}), ("h1", {"n": 2})]]

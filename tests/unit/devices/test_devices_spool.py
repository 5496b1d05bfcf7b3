"""The controller spool: FIFO order, bound, drop policies and their counters, drain."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from edgevisor.devices.spool import DropPolicy, Spool, SpoolItem
from edgevisor.errors import PeerUnavailable


def test_devices_spool_fifo_and_ack(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "s.db", max_items=100)
    for i in range(5):
        assert sp.put("message", {"i": i})
    items = sp.peek(3)
    assert [it.body["i"] for it in items] == [0, 1, 2]
    assert sp.ack(items[-1].seq) == 3
    assert [it.body["i"] for it in sp.peek(10)] == [3, 4]
    assert sp.stats()["delivered"] == 3 and len(sp) == 2


def test_devices_spool_drop_oldest(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "s.db", max_items=3, policy=DropPolicy.DROP_OLDEST)
    for i in range(5):
        assert sp.put("message", {"i": i})
    assert [it.body["i"] for it in sp.peek(10)] == [2, 3, 4]
    assert sp.stats()["dropped"] == 2


def test_devices_spool_reject_newest(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "s.db", max_items=3, policy=DropPolicy.REJECT_NEWEST)
    results = [sp.put("message", {"i": i}) for i in range(5)]
    assert results == [True, True, True, False, False]
    assert [it.body["i"] for it in sp.peek(10)] == [0, 1, 2]
    assert sp.stats()["rejected"] == 2


def test_devices_spool_survives_reopen_with_counters(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "s.db", max_items=2)
    for i in range(4):
        sp.put("shadow", {"i": i})
    sp.close()
    again = Spool(tmp_path / "s.db", max_items=2)
    assert len(again) == 2
    assert [(it.kind, it.body["i"]) for it in again.peek()] == [("shadow", 2), ("shadow", 3)]
    assert again.stats()["dropped"] == 2


async def test_devices_spool_drain_in_order_and_stops_on_failure(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "s.db", max_items=1000)
    for i in range(25):
        sp.put("message", {"i": i})
    got: list[int] = []
    fail_after = 2

    async def send(batch: Sequence[SpoolItem]) -> None:
        nonlocal fail_after
        if fail_after == 0:
            raise PeerUnavailable("controller down")
        fail_after -= 1
        got.extend(it.body["i"] for it in batch)

    with pytest.raises(PeerUnavailable):
        await sp.drain(send, batch=10)
    assert got == list(range(20))
    assert [it.body["i"] for it in sp.peek(100)] == list(range(20, 25))
    fail_after = 100
    assert await sp.drain(send, batch=10) == 5
    assert got == list(range(25)) and len(sp) == 0

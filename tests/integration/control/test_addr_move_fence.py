"""Fencing of a move's pushes with prepare/commit, on a real agent pair.

Two agent apps (uvicorn) run the real records capability (``records.apply``,
``records.prepare``, ``records.commit`` of :class:`AddressesCapability`) over a recording
stand-in for the kernel dataplane, and the controller's :func:`addr_sync.push` sends a
move to them over the push channel. The old host's apply is slowed down, so a new host
told too early would show in the order of the recorded applies: the new host's kernel
commit must come after the old host answered, every time; its prepare arrives while the
old host is still applying (that is the point of it) and changes nothing.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from edgevisor.agent.addresses import AddressesCapability
from edgevisor.agent.records_staging import Staging
from edgevisor.agent.rpc import OpRouter
from edgevisor.control import addr_sync
from edgevisor.control.addr_sync import Push, agent_http
from edgevisor.control.agent_http import AgentHttp
from edgevisor.control.links import AgentLinks
from edgevisor.network.lifecycle import State
from edgevisor.network.records import AddressRecord
from edgevisor.settings import load_settings

KEY = "k"
T0 = datetime(2026, 11, 28, 1, 0, tzinfo=UTC)
Log = list[tuple[float, str, str, str]]  # (when, host, what, detail)


class SlowRouter(OpRouter):
    """The agent's router, logging each op's start and end; ``delay_s`` per op first."""

    def __init__(self, host: str, log: Log, delay_s: dict[str, float]) -> None:
        super().__init__()
        self.host, self.log, self.delay_s = host, log, delay_s

    async def dispatch(self, name: str, payload: Any) -> Any:
        self.log.append((time.monotonic(), self.host, f"{name} start", ""))
        await asyncio.sleep(self.delay_s.get(name, 0.0))
        try:
            return await super().dispatch(name, payload)
        finally:
            self.log.append((time.monotonic(), self.host, f"{name} end", ""))


class RecordingDataplane:
    """Stands in for the kernel tables: logs each commit (what would enter the kernel)."""

    def __init__(self, host: str, log: Log) -> None:
        self.host, self.log = host, log
        self.generation = 0
        self.last_error: str | None = None

    def prepare(self, records: Any) -> Any:
        # Planned ahead: nothing enters the kernel (the log shows commits only).
        return ("prepared", tuple(records))

    def commit(self, records: Any, *, full: bool = False, prepared: Any = None) -> Any:
        recs = list(records)
        for r in recs:
            self.log.append(
                (
                    time.monotonic(),
                    self.host,
                    "kernel",
                    f"{r.logical}->{r.physical}@{r.host}:{r.state}:{r.generation}"
                    + (" (planned ahead)" if prepared == ("prepared", tuple(recs)) else ""),
                )
            )
            self.generation = max(self.generation, r.generation)
        return SimpleNamespace(
            batch=SimpleNamespace(element_ops=len(recs), flush=False),
            committed_s=0.0,
            started=time.perf_counter(),
        )

    def finish_links(self, _pending: Any) -> list[str]:
        return []


async def _agent(tmp: Path, host: str, log: Log, delay_s: dict[str, float]) -> Any:
    settings = load_settings(
        overrides={"data_dir": str(tmp / host), "network.dataplane_mode": "off"}, environ={}
    )
    cap = AddressesCapability(settings)
    router = SlowRouter(host, log, delay_s)
    await cap.start(SimpleNamespace(router=router, dir=tmp / host, host=host))  # type: ignore[arg-type]
    cap.dp = RecordingDataplane(host, log)  # type: ignore[assignment]
    cap.unavailable = None
    return cap, router


class Reports:
    def __init__(self) -> None:
        self.got: list[tuple[str, Any]] = []

    def add(self, got: list[tuple[str, Any]]) -> None:
        self.got.extend(got)


def _state(channels: bool = True) -> Any:
    st = SimpleNamespace(
        links=AgentLinks(None),  # type: ignore[arg-type]
        settings=SimpleNamespace(network=SimpleNamespace(push_timeout_s=10.0)),
    )
    st._edgevisor_netstore = SimpleNamespace(reports=Reports())
    if not channels:
        st._edgevisor_agent_http = AgentHttp(channels=False)
    return st


def _move(gen: int, old: tuple[str, Any] | str, new: tuple[str, Any]) -> Push:
    rec = AddressRecord(
        id=7,
        account="acme",
        network_id=1,
        logical="10.20.0.7",
        physical=f"172.16.0.{gen}",
        host="h1",
        instance="i",
        state=State.BOUND,
        generation=gen,
        held_until=None,
        created_at=T0,
        updated_at=T0,
    )
    wire = {
        "id": 7,
        "account": "acme",
        "logical": "10.20.0.7",
        "physical": rec.physical,
        "host": "h1",
        "state": "bound",
        "generation": gen,
    }
    change = Push(rec, {"h0"}, {"h1"}, first="h0")
    change.bodies = {
        "h0": {"full": False, "records": [], "removed": [wire]},
        "h1": {"full": False, "records": [wire], "removed": []},
    }
    change.endpoints = {"h0": old, "h1": new}
    return change


def _when(log: Log, host: str, what: str) -> list[float]:
    return [t for t, h, w, _ in log if h == host and w == what]


async def _pair(tmp: Path, serve: Any, log: Log, old_delay_s: float) -> Any:
    h0 = await _agent(tmp, "h0", log, {"records.apply": old_delay_s})
    h1 = await _agent(tmp, "h1", log, {})
    return h0, h1


async def test_new_host_applies_only_after_the_old_host_answered(
    tmp_path: Path, serve: Any
) -> None:
    log: Log = []
    (cap0, r0), (cap1, r1) = await _pair(tmp_path, serve, log, old_delay_s=0.3)
    st = _state()
    async with serve(r0, KEY) as u0, serve(r1, KEY) as u1:
        fast = agent_http(st)
        assert fast is not None
        for host, url in (("h0", u0), ("h1", u1)):
            ch = fast.channel(host, (url, KEY))
            assert ch is not None
            assert await ch.wait_open(10), ch.last_error
        try:
            for gen in (2, 3, 4):
                # The previous move's link work done on the new host (while it runs, a
                # prepare is staged but not planned ahead: the commit plans it).
                for _ in range(500):
                    if not cap1._lock.locked():
                        break
                    await asyncio.sleep(0.01)
                log.clear()
                change = await addr_sync.push(st, _move(gen, (u0, KEY), (u1, KEY)))
                assert change.results == {"h0": "ok", "h1": "ok"}, change.results
                old_done = _when(log, "h0", "records.apply end")[0]
                # The new host was prepared while the old one applied ...
                assert _when(log, "h1", "records.prepare start")[0] < old_done
                # ... and nothing reached its kernel before the old host answered.
                assert _when(log, "h1", "kernel")[0] > old_done
                # Its commit sent the batch it planned while the old host applied.
                assert [d for _, h, w, d in log if h == "h1" and w == "kernel"] == [
                    f"10.20.0.7->172.16.0.{gen}@h1:active:{gen} (planned ahead)"
                ]
                assert _when(log, "h1", "records.commit start")[0] > old_done
                assert _when(log, "h1", "records.apply start") == []
                assert cap1.applied == {7: gen}
                assert cap0.applied == {}
            assert [h for h, _ in st._edgevisor_netstore.reports.got] == ["h0", "h1"] * 3
        finally:
            await fast.aclose()
            await st.links.aclose()


async def test_without_a_channel_the_new_host_gets_the_plain_apply_after_the_old(
    tmp_path: Path, serve: Any
) -> None:
    log: Log = []
    (_cap0, r0), (cap1, r1) = await _pair(tmp_path, serve, log, old_delay_s=0.3)
    st = _state(channels=False)
    async with serve(r0, KEY) as u0, serve(r1, KEY) as u1:
        try:
            change = await addr_sync.push(st, _move(2, (u0, KEY), (u1, KEY)))
            assert change.results == {"h0": "ok", "h1": "ok"}
            old_done = _when(log, "h0", "records.apply end")[0]
            assert _when(log, "h1", "records.prepare start") == []
            assert _when(log, "h1", "records.apply start")[0] > old_done
            assert _when(log, "h1", "kernel")[0] > old_done
            assert cap1.applied == {7: 2}
        finally:
            await st._edgevisor_agent_http.aclose()
            await st.links.aclose()


async def test_expired_prepare_falls_back_to_the_full_apply(tmp_path: Path, serve: Any) -> None:
    log: Log = []
    (_cap0, r0), (cap1, r1) = await _pair(tmp_path, serve, log, old_delay_s=0.4)
    cap1._staged = Staging(ttl_s=0.05)  # expires while the old host applies
    st = _state()
    async with serve(r0, KEY) as u0, serve(r1, KEY) as u1:
        fast = agent_http(st)
        assert fast is not None
        for host, url in (("h0", u0), ("h1", u1)):
            ch = fast.channel(host, (url, KEY))
            assert ch is not None and await ch.wait_open(10)
        try:
            change = await addr_sync.push(st, _move(5, (u0, KEY), (u1, KEY)))
            assert change.results == {"h0": "ok", "h1": "ok"}
            old_done = _when(log, "h0", "records.apply end")[0]
            commit = _when(log, "h1", "records.commit start")
            apply = _when(log, "h1", "records.apply start")
            assert commit and apply and old_done < commit[0] < apply[0]
            assert len(_when(log, "h1", "kernel")) == 1  # only the full apply's
            assert cap1.applied == {7: 5}
        finally:
            await fast.aclose()
            await st.links.aclose()


async def test_unreachable_old_host_still_lets_the_new_host_apply(
    tmp_path: Path, serve: Any
) -> None:
    log: Log = []
    (_cap0, _r0), (cap1, r1) = await _pair(tmp_path, serve, log, old_delay_s=0.0)
    st = _state()
    async with serve(r1, KEY) as u1:
        fast = agent_http(st)
        assert fast is not None
        ch = fast.channel("h1", (u1, KEY))
        assert ch is not None and await ch.wait_open(10)
        try:
            change = await addr_sync.push(st, _move(6, "host 'h0' is down", (u1, KEY)))
            assert change.results == {"h0": "host 'h0' is down", "h1": "ok"}
            assert cap1.applied == {7: 6}
            assert _when(log, "h1", "records.commit start")
        finally:
            await fast.aclose()
            await st.links.aclose()


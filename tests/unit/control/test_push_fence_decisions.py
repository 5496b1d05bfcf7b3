"""Prepare/commit decisions of a fenced push (control.addr_fence), with a scripted
stand-in for the agents' transport (the real one is in the integration tests)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest

from edgevisor.agent.channel_frames import NotPrepared
from edgevisor.control.addr_fence import Prepares, prepare_targets, token_for
from edgevisor.control.addr_sync import Push
from edgevisor.errors import Conflict, PeerUnavailable
from edgevisor.network.lifecycle import State
from edgevisor.network.records import AddressRecord

T0 = datetime(2026, 11, 28, tzinfo=UTC)


def test_prepare_targets_need_an_endpoint_a_body_and_an_open_channel() -> None:
    endpoints: dict[str, tuple[str, str] | str] = {
        "a": ("http://a", "k"),
        "b": "host 'b' is down",
        "c": ("http://c", "k"),
        "d": ("http://d", "k"),
    }
    bodies: dict[str, dict[str, Any]] = {"a": {}, "b": {}, "d": {}}
    asked: list[str] = []

    def channel_open(host: str, ep: tuple[str, str]) -> bool:
        asked.append(host)
        assert ep == endpoints[host]
        return host != "d"

    assert prepare_targets(["a", "b", "c", "d", "e"], endpoints, bodies, channel_open) == ["a"]
    assert asked == ["a", "d"]


def test_tokens_name_the_record_and_differ() -> None:
    t1, t2 = token_for(7, 3), token_for(7, 3)
    assert t1.startswith("7.3.") and t2.startswith("7.3.") and t1 != t2


class Script:
    """Answers per (host, op): a value, or an exception to raise."""

    def __init__(self, answers: dict[tuple[str, str], Any]) -> None:
        self.answers = answers
        self.calls: list[tuple[str, str, dict[str, Any]]] = []

    async def call(self, host: str, op: str, payload: dict[str, Any], **_kw: Any) -> Any:
        self.calls.append((host, op, payload))
        await asyncio.sleep(0)
        got = self.answers[(host, op)]
        if isinstance(got, Exception):
            raise got
        return got


def _change() -> Push:
    rec = AddressRecord(
        id=7,
        account="acme",
        network_id=1,
        logical="10.0.0.7",
        physical="172.16.0.9",
        host="h1",
        instance="i",
        state=State.BOUND,
        generation=3,
        held_until=None,
        created_at=T0,
        updated_at=T0,
    )
    change = Push(rec, {"h0"}, {"h1"}, first="h0")
    change.endpoints = {"h1": ("http://h1", "k")}
    change.bodies = {"h1": {"full": False, "records": [{"id": 7}], "removed": []}}
    return change


OK = {"reports": [{"record_id": 7, "generation": 3, "error": None}], "error": None}


def _outcome(result: Any) -> str:
    return "ok" if result is OK else "other"


async def _commit(answers: dict[tuple[str, str], Any]) -> tuple[str, Script, list[Any], int]:
    fast = Script(answers)
    change = _change()
    prepares = Prepares(fast, change, ["h1"], timeout_s=5)  # type: ignore[arg-type]
    assert "h1" in prepares and "h0" not in prepares
    reports: list[Any] = []
    plain = 0

    async def apply() -> str:
        nonlocal plain
        plain += 1
        return "plain"

    got = await prepares.commit("h1", reports, apply, _outcome)
    return got, fast, reports, plain


async def test_prepared_host_is_committed_by_token() -> None:
    got, fast, reports, plain = await _commit(
        {("h1", "records.prepare"): {"prepared": "x"}, ("h1", "records.commit"): OK}
    )
    assert (got, plain) == ("ok", 0)
    (_, op1, prep), (_, op2, commit) = fast.calls
    assert (op1, op2) == ("records.prepare", "records.commit")
    assert prep["records"] == [{"id": 7}] and prep["token"].startswith("7.3.")
    assert commit == {"token": prep["token"]}
    assert reports == [("h1", OK)]


@pytest.mark.parametrize("failure", [PeerUnavailable("no answer"), Conflict("refused")])
async def test_failed_prepare_means_the_plain_apply(failure: Exception) -> None:
    got, fast, reports, plain = await _commit({("h1", "records.prepare"): failure})
    assert (got, plain, reports) == ("plain", 1, [])
    assert [op for _, op, _ in fast.calls] == ["records.prepare"]


async def test_commit_not_prepared_means_the_plain_apply() -> None:
    got, _fast, reports, plain = await _commit(
        {
            ("h1", "records.prepare"): {"prepared": "x"},
            ("h1", "records.commit"): NotPrepared("expired"),
        }
    )
    assert (got, plain, reports) == ("plain", 1, [])


async def test_commit_unreachable_or_refused_is_the_push_outcome() -> None:
    got, _f, reports, plain = await _commit(
        {
            ("h1", "records.prepare"): {"prepared": "x"},
            ("h1", "records.commit"): PeerUnavailable("agent on host 'h1' is unreachable"),
        }
    )
    assert (got, plain, reports) == ("agent on host 'h1' is unreachable", 0, [])
    got, _f, reports, plain = await _commit(
        {
            ("h1", "records.prepare"): {"prepared": "x"},
            ("h1", "records.commit"): Conflict("bad record"),
        }
    )
    assert (got, plain, reports) == ("bad record", 0, [])


async def test_cancel_stops_unanswered_prepares() -> None:
    gate = asyncio.Event()

    class Hang(Script):
        async def call(self, host: str, op: str, payload: dict[str, Any], **_kw: Any) -> Any:
            self.calls.append((host, op, payload))
            await gate.wait()

    fast = Hang({})
    prepares = Prepares(fast, _change(), ["h1"], timeout_s=5)  # type: ignore[arg-type]
    await asyncio.sleep(0)
    await prepares.cancel()
    assert all(t.cancelled() for t in prepares._sent.values())

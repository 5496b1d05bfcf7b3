"""records.prepare / records.commit of the agent's records capability, with a stand-in
for the kernel tables (what would enter the kernel is logged)."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from edgevisor.agent.addresses import AddressesCapability
from edgevisor.agent.channel_frames import NotPrepared
from edgevisor.agent.rpc import OpRouter
from edgevisor.errors import RequestError
from edgevisor.settings import load_settings


class RecordingDataplane:
    def __init__(self) -> None:
        self.host = "h1"
        self.generation = 0
        self.last_error: str | None = None
        self.kernel: list[tuple[int, str]] = []  # (generation, physical) per commit
        self.planned: list[tuple[Any, ...]] = []  # records of each prepare
        self.given: list[Any] = []  # the prepared argument of each commit

    def prepare(self, records: Any) -> Any:
        # Planned ahead: nothing enters the kernel (the log shows commits only).
        recs = tuple(records)
        self.planned.append(recs)
        return ("prepared", recs)

    def commit(self, records: Any, *, full: bool = False, prepared: Any = None) -> Any:
        self.given.append(prepared)
        for r in records:
            self.kernel.append((r.generation, str(r.physical)))
        return SimpleNamespace(
            batch=SimpleNamespace(element_ops=1, flush=False),
            committed_s=0.0,
            started=time.perf_counter(),
        )

    def finish_links(self, _pending: Any) -> list[str]:
        return []


async def _cap(tmp_path: Path) -> tuple[AddressesCapability, RecordingDataplane, OpRouter]:
    settings = load_settings(
        overrides={"data_dir": str(tmp_path), "network.dataplane_mode": "off"}, environ={}
    )
    cap = AddressesCapability(settings)
    router = OpRouter()
    await cap.start(SimpleNamespace(router=router, dir=tmp_path, host="h1"))  # type: ignore[arg-type]
    dp = RecordingDataplane()
    cap.dp = dp  # type: ignore[assignment]
    cap.unavailable = None
    return cap, dp, router


def _body(gen: int, token: str) -> dict[str, Any]:
    return {
        "token": token,
        "removed": [],
        "records": [
            {
                "id": 7,
                "account": "acme",
                "logical": "10.0.0.7",
                "physical": f"172.16.0.{gen}",
                "host": "h1",
                "state": "bound",
                "generation": gen,
            }
        ],
    }


async def test_prepare_touches_nothing_and_commit_applies_once(tmp_path: Path) -> None:
    cap, dp, router = await _cap(tmp_path)
    assert {"records.prepare", "records.commit"} <= set(router.names)
    got = await router.dispatch("records.prepare", _body(3, "t1"))
    assert got == {"prepared": "t1", "records": 1}
    assert dp.kernel == [] and cap.applied == {} and cap.seen == {}
    out = await router.dispatch("records.commit", {"token": "t1"})
    assert out["reports"] == [{"record_id": 7, "generation": 3, "error": None}]
    assert {"started_s", "handled_s", "handled_cpu_s"} <= set(out)
    assert dp.kernel == [(3, "172.16.0.3")]
    assert cap.applied == {7: 3}
    with pytest.raises(NotPrepared):
        await router.dispatch("records.commit", {"token": "t1"})  # taken already
    assert dp.kernel == [(3, "172.16.0.3")]


async def test_commit_of_an_overtaken_prepare_changes_nothing(tmp_path: Path) -> None:
    cap, dp, router = await _cap(tmp_path)
    await router.dispatch("records.prepare", _body(3, "old"))
    await router.dispatch("records.apply", {k: v for k, v in _body(4, "-").items() if k != "token"})
    out = await router.dispatch("records.commit", {"token": "old"})
    assert out["reports"] == []  # generation 3 is behind 4: skipped
    assert cap.applied == {7: 4}
    assert dp.kernel[-1] == (4, "172.16.0.4")


async def test_bad_prepares_and_commits_are_refused(tmp_path: Path) -> None:
    _, dp, router = await _cap(tmp_path)
    with pytest.raises(NotPrepared):
        await router.dispatch("records.commit", {"token": "never"})
    with pytest.raises(RequestError, match="token"):
        await router.dispatch("records.prepare", {"records": []})
    with pytest.raises(RequestError, match="delta"):
        await router.dispatch("records.prepare", {**_body(3, "t"), "full": True})
    with pytest.raises(RequestError, match="malformed record"):
        await router.dispatch("records.prepare", {"token": "t", "records": [{"id": 1}]})
    with pytest.raises(RequestError, match="lists"):
        await router.dispatch("records.prepare", {"token": "t", "records": {}})
    with pytest.raises(NotPrepared):  # none of those was staged
        await router.dispatch("records.commit", {"token": "t"})
    assert dp.kernel == []


async def test_prepare_plans_ahead_and_commit_hands_the_plan_over(tmp_path: Path) -> None:
    _, dp, router = await _cap(tmp_path)
    await router.dispatch("records.prepare", _body(3, "t1"))
    assert [[(r.generation, str(r.physical)) for r in recs] for recs in dp.planned] == [
        [(3, "172.16.0.3")]
    ]
    assert dp.kernel == []
    await router.dispatch("records.commit", {"token": "t1"})
    assert dp.given == [("prepared", dp.planned[0])]


async def test_no_plan_ahead_while_an_update_is_under_way(tmp_path: Path) -> None:
    cap, dp, router = await _cap(tmp_path)
    await cap._lock.acquire()  # a commit or its link work (maybe in a thread) runs
    try:
        await router.dispatch("records.prepare", _body(3, "t1"))
    finally:
        cap._lock.release()
    assert dp.planned == []
    await router.dispatch("records.commit", {"token": "t1"})
    assert dp.given == [None] and dp.kernel == [(3, "172.16.0.3")]

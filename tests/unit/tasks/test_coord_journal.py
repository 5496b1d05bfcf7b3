"""The call journal: committed before ack, readable by another connection, idempotency
keys unique, task versions persisted."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from edgevisor.errors import StoreUnavailable
from edgevisor.tasks.calls import CallState, TaskVersion
from edgevisor.tasks.queue import CallJournal, row_of
from edgevisor.tasks.spec import parse_manifest


def _state(cid: str, key: str | None = None, *, async_: bool = True) -> CallState:
    return CallState(
        cid, "t", "v1", "v1", {"x": 1}, async_=async_, idempotency_key=key,
        priority=0, created_at=1.0, enqueued_mono=1.0,
    )  # fmt: skip


def _count(path: Path, where: str = "1=1") -> int:
    # a separate connection, as a new process after a crash would see the file
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute(f"SELECT count(*) FROM calls WHERE {where}").fetchone()[0])
    finally:
        conn.close()


async def test_persist_is_committed_when_it_returns(tmp_path: Path) -> None:
    j = CallJournal(tmp_path / "calls.db", lazy_delay_s=10.0)
    await j.open()
    try:
        conn = sqlite3.connect(tmp_path / "calls.db")
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        conn.close()
        await j.persist(row_of(_state("a")))
        assert _count(tmp_path / "calls.db") == 1
        # a lazy row waits for the batch delay (10 s here) unless someone flushes
        s = _state("b", async_=False)
        s.status = "succeeded"
        j.persist_lazily(row_of(s))
        assert _count(tmp_path / "calls.db") == 1
        await j.flush()
        assert _count(tmp_path / "calls.db", "status = 'succeeded'") == 1
        opened = await j.open_calls()
        assert [r.id for r in opened] == ["a"] and opened[0].event == {"x": 1}
        # a final row for an async call updates it in place
        a = _state("a")
        a.status, a.result, a.run_s = "succeeded", [1, 2], 0.5
        await j.persist(row_of(a))
        rec = await j.get("a")
        assert rec is not None and rec.result == [1, 2] and rec.run_s == 0.5
        assert await j.open_calls() == []
    finally:
        await j.close()


async def test_idempotency_key_is_unique(tmp_path: Path) -> None:
    j = CallJournal(tmp_path / "calls.db")
    await j.open()
    try:
        await j.persist(row_of(_state("a", "k")))
        rec = await j.by_idempotency_key("k")
        assert rec is not None and rec.id == "a"
        with pytest.raises(StoreUnavailable):
            await j.persist(row_of(_state("b", "k")))
        await j.persist(row_of(_state("c", "other")))  # the writer survived the bad batch
        assert _count(tmp_path / "calls.db") == 2
    finally:
        await j.close()


async def test_task_versions_round_trip(tmp_path: Path) -> None:
    spec = parse_manifest({"name": "t", "runtime": "python", "handler": "m:f", "memory": "64M"})
    j = CallJournal(tmp_path / "calls.db")
    await j.open()
    await j.save_task(TaskVersion(name="t", version="v1", bundle="b1", spec=spec, deployed_at=5.0))
    await j.close()
    j2 = CallJournal(tmp_path / "calls.db")
    await j2.open()
    try:
        current, versions = await j2.load_tasks()
        assert current == {"t": "v1"}
        assert versions["v1"].spec == spec
        await j2.remove_task("t")
        assert (await j2.load_tasks())[0] == {}
    finally:
        await j2.close()


async def test_prune_keeps_open_and_recent_calls(tmp_path: Path) -> None:
    j = CallJournal(tmp_path / "calls.db")
    await j.open()
    try:
        old, recent, still_open = _state("old"), _state("recent"), _state("open")
        old.status, old.finished_at = "succeeded", 100.0
        recent.status, recent.finished_at = "failed", 1000.0
        for s in (old, recent, still_open):
            await j.persist(row_of(s))
        assert await j.prune(500.0) == 1
        assert await j.get("old") is None
        assert await j.get("recent") is not None and await j.get("open") is not None
    finally:
        await j.close()

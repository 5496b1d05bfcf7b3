"""The remap hot path (control.addr_move.FastMover) against the Session path (move_txn).

Two stores built the same way take the same moves, one through each path: the records,
history rows, events, push bodies and endpoints must come out the same, through the
physical cursor and then the free-list. Moves out of the common case change nothing and
are left to the Session path; a held write lock makes the no-wait call give up (Busy).
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, insert, select, text
from sqlalchemy.orm import Session, sessionmaker

from edgevisor.control.addr_move import Busy, FastMover
from edgevisor.control.addr_sync import Push
from edgevisor.control.api_addresses import move_txn
from edgevisor.network import host_reports as hr
from edgevisor.network import records as rec
from edgevisor.store import all_models, models  # noqa: F401 - tables for create_all
from edgevisor.store.base import Base


class _Links:
    @staticmethod
    def is_local(_host: str) -> bool:
        return False


def _state() -> Any:
    return SimpleNamespace(
        settings=SimpleNamespace(network=SimpleNamespace(host_group="g")),
        clock=lambda: 1234.5,
        links=_Links(),
    )


def _store(path: Path) -> tuple[Engine, sessionmaker[Session], int]:
    engine = create_engine(f"sqlite:///{path}", connect_args={"check_same_thread": False})
    rec.configure_sqlite(engine)
    Base.metadata.create_all(engine)
    sessions = sessionmaker(engine, expire_on_commit=False)
    with engine.begin() as c:
        for i, name in enumerate(("h0", "h1", "h2")):
            c.execute(
                insert(models.Host).values(
                    name=name,
                    credential_sha256=f"{i:064d}",
                    state="down" if name == "h2" else "up",
                    agent_url=f"http://{name}:7451",
                    agent_key=f"k{i}",
                    joined_at=0.0,
                    last_heartbeat_at=0.0,
                    state_changed_at=0.0,
                    info={},
                )
            )
        acct = c.execute(
            insert(models.Account).values(name="acme", created_at=0.0).returning(models.Account.id)
        ).scalar_one()
    with sessions.begin() as s:
        rec.create_network(s, account="acme", name="lan", cidr="10.20.0.0/24")
        # A /29: 6 usable physical addresses, so the cursor ends and the free-list serves.
        rec.create_physical_pool(s, host_group="g", cidr="172.16.0.0/29")
        a = rec.allocate(s, account="acme", network="lan", address="10.20.0.5")
        b = rec.allocate(s, account="acme", network="lan", address="10.20.0.7")
        a = rec.bind(s, account="acme", record=a.id, instance="a", host="h0", host_group="g")
        b = rec.bind(s, account="acme", record=b.id, instance="b", host="h1", host_group="g")
        hr.report_applied(
            s,
            host="h1",
            reports=[
                hr.AppliedReport(record_id=a.id, generation=a.generation, error=None),
                hr.AppliedReport(record_id=b.id, generation=b.generation, error=None),
            ],
        )
    return engine, sessions, int(acct)


def _plain(change: Push) -> Any:
    r = change.record
    return {
        "record": (r.id, r.logical, r.physical, r.host, r.instance, r.state.value, r.generation),
        "before": sorted(change.before),
        "after": sorted(change.after),
        "first": change.first,
        "targets": change.targets(),
        "bodies": change.bodies,
        "endpoints": change.endpoints,
    }


def _rows(engine: Engine) -> Any:
    with engine.connect() as c:
        recs = c.execute(
            text(
                "SELECT id, physical_pool_id, physical, host, instance, state, generation "
                "FROM address_records ORDER BY id"
            )
        ).all()
        hist = c.execute(
            text(
                "SELECT record_id, account, network_id, address, event, from_state, to_state, "
                "instance, host, physical, generation FROM address_history ORDER BY id"
            )
        ).all()
        events = c.execute(
            text("SELECT at, kind, account_id, subject, data FROM events ORDER BY id")
        ).all()
        free = c.execute(
            text("SELECT pool_id, address FROM physical_free_addresses ORDER BY id")
        ).all()
    return (
        [tuple(r) for r in recs],
        [tuple(h) for h in hist],
        [
            (e[0], e[1], e[2], e[3], json.loads(e[4]) if isinstance(e[4], str) else e[4])
            for e in events
        ],
        [tuple(f) for f in free],
    )


def test_fast_move_writes_and_pushes_what_the_session_path_does(tmp_path: Path) -> None:
    slow_engine, slow_sessions, acct = _store(tmp_path / "slow.db")
    fast_engine, fast_sessions, acct_f = _store(tmp_path / "fast.db")
    assert acct == acct_f
    mover = FastMover(fast_engine)
    st = _state()
    try:
        # h1 -> h2 (h1 leaves acme's set, h2 joins), then between h0/h2 and back: enough
        # moves to end the /29's cursor and take addresses from the free-list.
        for i, host in enumerate(["h2", "h0", "h2", "h0", "h1", "h2", "h0", "h1"]):
            admin_id = None if i % 2 else acct  # the admin's call looks the id up
            with slow_sessions.begin() as s:
                slow = move_txn(
                    s,
                    st,
                    account="acme",
                    account_id=acct,
                    ref="10.20.0.7",
                    host=host,
                    expected_generation=None,
                )
            fast = mover.move(
                st,
                account="acme",
                account_id=admin_id,
                ref="10.20.0.7",
                host=host,
                host_group="g",
                expected_generation=None,
                wait=i % 3 == 0,
            )
            assert fast is not None, f"move {i} to {host} left to the Session path"
            assert _plain(fast) == _plain(slow), f"move {i} to {host}"
            with fast_sessions() as s:
                stored = rec.get_record(s, account="acme", record="10.20.0.7")
            assert fast.record == stored  # timestamps as the Session reads them too
        got, want = _rows(fast_engine), _rows(slow_engine)
        assert got == want
        assert [h[4] for h in got[1]].count("move") == 8
        assert got[3], "the free-list was used and refilled"
    finally:
        mover.close()
        slow_engine.dispose()
        fast_engine.dispose()


@pytest.mark.parametrize(
    "case",
    [
        "by_id",
        "unknown_account",
        "unknown_host",
        "same_host",
        "not_bound",
        "stale_generation",
        "bad_address",
        "unknown_address",
    ],
)
def test_moves_out_of_the_common_case_change_nothing(tmp_path: Path, case: str) -> None:
    engine, sessions, acct = _store(tmp_path / "s.db")
    mover = FastMover(engine)
    st = _state()
    with sessions() as s:
        b = s.execute(select(rec.REC).where(rec.REC.c.logical == "10.20.0.7")).one()
    args: dict[str, Any] = {
        "account": "acme",
        "account_id": acct,
        "ref": "10.20.0.7",
        "host": "h2",
        "host_group": "g",
        "expected_generation": None,
    }
    if case == "by_id":
        args["ref"] = str(b.id)
    elif case == "unknown_account":
        args.update(account="nobody", account_id=None)
    elif case == "unknown_host":
        args["host"] = "h9"
    elif case == "same_host":
        args["host"] = "h1"
    elif case == "not_bound":
        with sessions.begin() as s:
            rec.preserve(s, account="acme", record=b.id)
    elif case == "stale_generation":
        args["expected_generation"] = b.generation - 1
    elif case == "bad_address":
        args["ref"] = "10.20.0.300"
    elif case == "unknown_address":
        args["ref"] = "10.20.0.9"
    before = _rows(engine)
    try:
        assert mover.move(st, **args) is None
        assert mover.move(st, **args, wait=False) is None
        assert _rows(engine) == before
    finally:
        mover.close()
        engine.dispose()


def test_no_wait_move_gives_up_on_a_held_write_lock(tmp_path: Path) -> None:
    engine, _sessions, acct = _store(tmp_path / "s.db")
    mover = FastMover(engine)
    st = _state()
    other = sqlite3.connect(tmp_path / "s.db", isolation_level=None)
    args: dict[str, Any] = {
        "account": "acme",
        "account_id": acct,
        "ref": "10.20.0.7",
        "host": "h2",
        "host_group": "g",
        "expected_generation": None,
    }
    try:
        before = _rows(engine)
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(Busy):
            mover.move(st, **args, wait=False)
        other.execute("ROLLBACK")
        assert _rows(engine) == before
        moved = mover.move(st, **args, wait=False)
        assert moved is not None and moved.record.host == "h2"
    finally:
        other.close()
        mover.close()
        engine.dispose()


def test_fast_mover_is_sqlite_only() -> None:
    engine = create_engine("postgresql+psycopg://u:p@127.0.0.1:1/none")
    with pytest.raises(ValueError, match="SQLite only"):
        FastMover(engine)

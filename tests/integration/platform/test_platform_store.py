"""The store suite, on SQLite (WAL) and on a throwaway PostgreSQL."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text

import edgevisor.store.all_models  # noqa: F401
from edgevisor.errors import AlreadyExists, NotFound, StoreUnavailable, Unauthorized
from edgevisor.store import repos
from edgevisor.store.base import Base
from edgevisor.store.engine import Store, redact


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'store.db'}"
    else:
        pg: Any = request.getfixturevalue("postgres_server")
        url = pg.create_database(f"store_{abs(hash(request.node.nodeid)) % 10**8}")
    st = Store(url).open()
    try:
        yield st
    finally:
        st.dispose()


def test_migrations_reach_head_and_match_models(store: Store) -> None:
    names = set(inspect(store.engine).get_table_names())
    assert {"accounts", "tokens", "hosts", "join_tokens", "events", "alembic_version"} <= names
    with store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == [], f"models and migrations differ: {diff}"
    store.upgrade()  # idempotent


def test_sqlite_runs_in_wal_mode(tmp_path: Path) -> None:
    st = Store(f"sqlite:///{tmp_path / 'w.db'}").open()
    with st.engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
    st.dispose()


def test_accounts_tokens_and_rollback(store: Store) -> None:
    with store.session() as s:
        acct = repos.create_account(s, "acme", 1.0)
        _tok, secret = repos.create_token(s, name="t", now=1.0, account=acct)
    with store.session() as s:
        tok = repos.token_by_secret(s, secret)
        assert tok is not None
        assert tok.account_id == acct.id
        assert tok.secret_sha256 != secret  # only the digest is stored
    with pytest.raises(AlreadyExists), store.session() as s:
        repos.create_account(s, "acme", 2.0)
    # A failing transaction leaves nothing behind.
    with pytest.raises(RuntimeError), store.session() as s:
        repos.create_account(s, "ghost", 3.0)
        raise RuntimeError("boom")
    with store.session() as s, pytest.raises(NotFound):
        repos.get_account(s, "ghost")


def test_join_token_is_spent_exactly_once_under_races(store: Store) -> None:
    with store.session() as s:
        _jt, secret = repos.create_join_token(s, 0.0, 100.0)
    wins: list[str] = []
    losses: list[str] = []

    def attempt(i: int) -> None:
        try:
            with store.session() as s:
                repos.spend_join_token(s, secret, f"h{i}", 1.0)
            wins.append(f"h{i}")
        except Unauthorized:
            losses.append(f"h{i}")
        except Exception as exc:  # a serialisation failure also counts as a loss
            losses.append(f"h{i}:{type(exc).__name__}")

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1, (wins, losses)
    assert len(losses) == 5


def test_expired_join_token_is_refused(store: Store) -> None:
    with store.session() as s:
        _jt, secret = repos.create_join_token(s, 0.0, 10.0)
    with pytest.raises(Unauthorized, match="expired"), store.session() as s:
        repos.spend_join_token(s, secret, "h", 11.0)


def test_events_are_ordered_and_scoped(store: Store) -> None:
    with store.session() as s:
        a = repos.create_account(s, "a", 0.0)
        for i in range(5):
            repos.add_event(s, "k", float(i), subject=str(i), account_id=a.id if i % 2 else None)
    with store.session() as s:
        everything = repos.events_after(s, 0, None, admin=True)
        mine = repos.events_after(s, 0, a.id, admin=False)
        assert [e.subject for e in everything] == ["0", "1", "2", "3", "4"]
        assert [e.subject for e in mine] == ["1", "3"]
        assert repos.last_event_id(s) == everything[-1].id


def test_unreachable_store_is_a_clear_error() -> None:
    st = Store("postgresql+psycopg://u:secret@127.0.0.1:1/db")
    with pytest.raises(StoreUnavailable) as err:
        st.check()
    assert "unreachable" in err.value.message
    assert "secret" not in err.value.message
    assert redact("postgresql+psycopg://u:secret@h:1/db") == "postgresql+psycopg://u:***@h:1/db"

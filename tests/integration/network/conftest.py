"""Fixtures for network integration tests.

IPAM/records fixtures: ``store_url`` parametrised over SQLite (WAL file) and PostgreSQL (a
fresh database per test in the session-wide throwaway cluster ``postgres_server`` of
``tests/conftest.py``, built on :mod:`edgevisor.testing.postgres`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import Session, sessionmaker

from edgevisor.network.records import configure_sqlite
from edgevisor.store import network_models
from edgevisor.store.base import Base
from edgevisor.testing.postgres import PostgresServer

# --- IPAM / records fixtures (owner: IPAM) ----------------------------------------------


@pytest.fixture()
def postgres_url(postgres_server: PostgresServer) -> str:
    """A fresh, empty PostgreSQL database for one test."""
    return postgres_server.create_database()


@pytest.fixture()
def sqlite_url(tmp_path: Path) -> str:
    """A SQLite file for one test (WAL is switched on by the engine factory)."""
    return f"sqlite:///{tmp_path / 'store.db'}"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest) -> str:
    """The same test on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        return str(request.getfixturevalue("sqlite_url"))
    return str(request.getfixturevalue("postgres_url"))


def make_store_engine(url: str) -> Engine:
    """An engine with the network tables created (SQLite: WAL + BEGIN IMMEDIATE)."""
    engine = create_engine(url, pool_pre_ping=True)
    configure_sqlite(engine)
    tables = [
        t for t in Base.metadata.sorted_tables
        if t.name in {m.__tablename__ for m in _NETWORK_MODELS}
    ]
    Base.metadata.create_all(engine, tables=tables)
    return engine


_NETWORK_MODELS = [
    network_models.Network,
    network_models.PhysicalPool,
    network_models.NetworkFreeAddress,
    network_models.PhysicalFreeAddress,
    network_models.AddressRecordRow,
    network_models.AddressHistory,
    network_models.HostApplied,
]


@pytest.fixture()
def store_engine(store_url: str) -> Iterator[Engine]:
    engine = make_store_engine(store_url)
    try:
        yield engine
    finally:
        engine.dispose()


@pytest.fixture()
def sessions(store_engine: Engine) -> sessionmaker[Session]:
    """Session factory; use ``with sessions.begin() as s:`` for one transaction."""
    return sessionmaker(store_engine, expire_on_commit=False)

"""Fixtures shared by every test area: root gating, a throwaway PostgreSQL, a controller."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from edgevisor.testing.cgroup_cleanup import remove_empty_groups


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Root-only tests run as root (CI is root); elsewhere they are skipped with the reason.
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (namespaces, cgroups, nftables, FUSE, loop)")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _clean_cgroup_groups() -> Iterator[None]:
    yield
    remove_empty_groups()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[object]:
    """One throwaway PostgreSQL cluster for the whole run (initdb as user postgres)."""
    from edgevisor.testing.postgres import throwaway_postgres

    with throwaway_postgres() as pg:
        yield pg

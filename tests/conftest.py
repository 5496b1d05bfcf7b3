"""Fixtures shared by every test area: root gating, a throwaway PostgreSQL, a controller."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Root-only tests run as root (CI is root); elsewhere they are skipped with the reason.
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (namespaces, cgroups, nftables, FUSE, loop)")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


CGROUP_ROOT = Path("/sys/fs/cgroup")
# Grouping directories the agent keeps for the environments and domains it runs (like
# systemd slices); a test run removes them when it leaves them empty.
CGROUP_GROUPS = ("edgevisor", "edgevisor-domains")


def _remove_empty_cgroup_groups() -> None:
    for controller in ("memory", "pids", "cpu", "freezer"):
        for group in CGROUP_GROUPS:
            top = CGROUP_ROOT / controller / group
            if not top.is_dir():
                continue
            subdirs = sorted((p for p in top.rglob("*") if p.is_dir()), key=len_parts, reverse=True)
            for d in [*subdirs, top]:
                with contextlib.suppress(OSError):  # still holds a group: not ours to clear
                    d.rmdir()


def len_parts(p: Path) -> int:
    return len(p.parts)


@pytest.fixture(scope="session", autouse=True)
def _clean_cgroup_groups() -> Iterator[None]:
    yield
    if os.geteuid() == 0:
        _remove_empty_cgroup_groups()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[object]:
    """One throwaway PostgreSQL cluster for the whole run (initdb as user postgres)."""
    from edgevisor.testing.postgres import throwaway_postgres

    with throwaway_postgres() as pg:
        yield pg

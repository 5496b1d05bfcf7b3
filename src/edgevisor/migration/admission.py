"""Admission of a migration request: refused with the reason before anything changes."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from edgevisor.errors import NotFound
from edgevisor.migration.commands import MigrationRefused, MigrationSpec

if TYPE_CHECKING:
    from edgevisor.migration.machine import Migration

__all__ = ["admit"]


def admit(
    spec: MigrationSpec, *, hosts_up: Mapping[str, bool], active: Iterable[Migration]
) -> None:
    """Refuse a migration request before anything changes (raises; returns None if fine)."""
    if spec.source == spec.target:
        raise MigrationRefused(f"domain {spec.domain!r} is already on {spec.target!r}")
    for host in (spec.source, spec.target):
        if host not in hosts_up:
            raise NotFound(f"unknown host {host!r}")
        if not hosts_up[host]:
            raise MigrationRefused(f"host {host!r} is down")
    if spec.volume_bytes < 0:
        raise MigrationRefused("volume size must not be negative")
    for m in active:
        if m.spec.domain == spec.domain and not m.settled:
            raise MigrationRefused(
                f"domain {spec.domain!r} is already migrating ({m.spec.migration_id}, {m.phase})"
            )

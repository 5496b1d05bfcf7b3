"""Test driver for the migration state machine: answers pending commands by kind."""

from __future__ import annotations

from typing import Any

from edgevisor.migration.commands import Command, Done, Event, Failed, Mode
from edgevisor.migration.machine import Migration, MigrationSpec

SRC = "h0"
DST = "h1"


def make_spec(**overrides: Any) -> MigrationSpec:
    fields: dict[str, Any] = {
        "migration_id": "m1",
        "domain": "kv",
        "source": SRC,
        "target": DST,
        "volume_bytes": 1 << 20,
        "mode": Mode.POST_COPY,
        "has_address": True,
        "rate_bytes_s": None,
        "retry_delay_s": 2.0,
    }
    fields.update(overrides)
    return MigrationSpec(**fields)


class Driver:
    """Holds a machine and a clock; every call advances the clock by ``dt``."""

    def __init__(self, machine: Migration | None = None, **spec: Any) -> None:
        self.m = machine if machine is not None else Migration(make_spec(**spec))
        self.now = 0.0

    def start(self) -> list[Command]:
        return self.m.start(self.now)

    def send(self, event: Event, dt: float = 1.0) -> list[Command]:
        self.now += dt
        return self.m.handle(event, self.now)

    def pending(self, kind: str) -> Command:
        found = [c for c in self.m.pending.values() if c.kind == kind]
        assert len(found) == 1, f"expected one pending {kind}, have {self.pending_kinds()}"
        return found[0]

    def pending_kinds(self) -> list[str]:
        return sorted(c.kind for c in self.m.pending.values())

    def done(self, kind: str, dt: float = 1.0) -> list[Command]:
        return self.send(Done(self.pending(kind)), dt)

    def fail(self, kind: str, reason: str = "boom", dt: float = 1.0) -> list[Command]:
        return self.send(Failed(self.pending(kind), reason), dt)

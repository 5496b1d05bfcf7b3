"""Device shadows: a pure core (documents, patches, deltas, conflicts) and a SQLite store.

A shadow is one JSON document per device::

    {"device": "d1", "version": 7,
     "state": {"desired": {...}, "reported": {...}, "delta": {...}},
     "metadata": {"created_at": t, "updated_at": t, "desired_updated_at": t,
                  "reported_updated_at": t}}

Updates are *patches*: ``{"desired": {...}, "reported": {...}}``; objects merge recursively,
a ``null`` value deletes the key, any other value replaces. Every accepted update bumps
``version`` by one. An update may carry ``version``: if it is not the current version the
update is rejected with :class:`ShadowConflict`, which carries the current version
(optimistic concurrency: read, change, write back with the version read).

``delta`` is computed, never stored: the keys of ``desired`` whose value differs from
``reported`` (recursively into objects; a desired key absent from reported is in the delta).
The agent publishes it to the device on ``edgevisor/shadow/<name>/delta`` after each update
that leaves it non-empty.

Sync to the controller — the conflict rule (:func:`reconcile`):

1. ``reported`` is the agent's: devices report to their agent, never to the controller.
2. ``desired`` comes from the copy with the higher ``version`` (newest desired wins);
   on equal versions with different content, the later ``desired_updated_at`` wins, and on
   a full tie the agent's copy wins (it is the one devices already saw).
3. The result's version is ``max(local, remote)``, plus one if the agent's desired changed
   (so devices and later updates see a new version).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from edgevisor.errors import Conflict, RequestError

__all__ = [
    "Shadow",
    "ShadowConflict",
    "ShadowStore",
    "apply_update",
    "compute_delta",
    "merge_patch",
    "parse_update",
    "reconcile",
]


class ShadowConflict(Conflict):
    """The update named a version that is not the current one."""

    code = "shadow_conflict"

    def __init__(self, device: str, expected: int, current: int) -> None:
        super().__init__(
            f"shadow {device}: version {expected} is stale, current version is {current}",
            details={"device": device, "version": current, "expected": expected},
        )
        self.current_version = current


def merge_patch(base: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive merge; ``None`` deletes. Returns a new dict, inputs are untouched."""
    out = dict(base)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge_patch(out[key], value)
        elif isinstance(value, Mapping):
            out[key] = merge_patch({}, value)  # drops nulls inside a new object too
        else:
            out[key] = value
    return out


def _same(a: Any, b: Any) -> bool:
    # JSON equality: true != 1 although Python says True == 1.
    return (type(a) is type(b) and a == b) or (
        isinstance(a, int | float)
        and isinstance(b, int | float)
        and not isinstance(a, bool)
        and not isinstance(b, bool)
        and a == b
    )


def compute_delta(desired: Mapping[str, Any], reported: Mapping[str, Any]) -> dict[str, Any]:
    """Desired keys whose values differ from reported, recursively."""
    delta: dict[str, Any] = {}
    for key, want in desired.items():
        if key not in reported:
            delta[key] = want
            continue
        have = reported[key]
        if isinstance(want, Mapping) and isinstance(have, Mapping):
            sub = compute_delta(want, have)
            if sub:
                delta[key] = sub
        elif not _same(want, have):
            delta[key] = want
    return delta


@dataclass(frozen=True)
class Shadow:
    device: str
    version: int = 0
    desired: dict[str, Any] = field(default_factory=dict)
    reported: dict[str, Any] = field(default_factory=dict)
    created_at: float = 0.0
    updated_at: float = 0.0
    desired_updated_at: float = 0.0
    reported_updated_at: float = 0.0

    @property
    def delta(self) -> dict[str, Any]:
        return compute_delta(self.desired, self.reported)

    def to_json(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "version": self.version,
            "state": {"desired": self.desired, "reported": self.reported, "delta": self.delta},
            "metadata": {
                "created_at": self.created_at,
                "updated_at": self.updated_at,
                "desired_updated_at": self.desired_updated_at,
                "reported_updated_at": self.reported_updated_at,
            },
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Shadow:
        state = obj.get("state", {})
        meta = obj.get("metadata", {})
        return cls(
            device=str(obj["device"]),
            version=int(obj.get("version", 0)),
            desired=dict(state.get("desired", {})),
            reported=dict(state.get("reported", {})),
            created_at=float(meta.get("created_at", 0.0)),
            updated_at=float(meta.get("updated_at", 0.0)),
            desired_updated_at=float(meta.get("desired_updated_at", 0.0)),
            reported_updated_at=float(meta.get("reported_updated_at", 0.0)),
        )


def parse_update(obj: Any) -> tuple[dict[str, Any] | None, dict[str, Any] | None, int | None]:
    """Validate an update body ``{"state": {"desired"?, "reported"?}, "version"?}``.

    Returns ``(desired patch, reported patch, expected version)``; raises
    :class:`~edgevisor.errors.RequestError` naming what is wrong.
    """
    if not isinstance(obj, dict):
        raise RequestError("shadow update must be a JSON object")
    state = obj.get("state")
    if not isinstance(state, dict):
        raise RequestError("shadow update needs a 'state' object")
    unknown = set(state) - {"desired", "reported"}
    if unknown:
        raise RequestError(f"shadow update: unknown state keys {sorted(unknown)}")
    desired = state.get("desired")
    reported = state.get("reported")
    for name, part in (("desired", desired), ("reported", reported)):
        if part is not None and not isinstance(part, dict):
            raise RequestError(f"shadow update: state.{name} must be an object or null")
    version = obj.get("version")
    if version is not None and (not isinstance(version, int) or isinstance(version, bool)):
        raise RequestError("shadow update: version must be an integer")
    return desired, reported, version


def apply_update(
    shadow: Shadow,
    *,
    desired: Mapping[str, Any] | None,
    reported: Mapping[str, Any] | None,
    expected_version: int | None,
    now: float,
) -> Shadow:
    """The shadow after one update; raises :class:`ShadowConflict` on a stale version."""
    if expected_version is not None and expected_version != shadow.version:
        raise ShadowConflict(shadow.device, expected_version, shadow.version)
    new_desired = merge_patch(shadow.desired, desired) if desired is not None else shadow.desired
    new_reported = (
        merge_patch(shadow.reported, reported) if reported is not None else shadow.reported
    )
    return Shadow(
        device=shadow.device,
        version=shadow.version + 1,
        desired=new_desired,
        reported=new_reported,
        created_at=shadow.created_at or now,
        updated_at=now,
        desired_updated_at=now if desired is not None else shadow.desired_updated_at,
        reported_updated_at=now if reported is not None else shadow.reported_updated_at,
    )


def reconcile(local: Shadow, remote: Shadow) -> Shadow:
    """Merge the controller's copy into the agent's by the rule in the module docstring."""
    remote_wins = remote.version > local.version or (
        remote.version == local.version
        and remote.desired != local.desired
        and remote.desired_updated_at > local.desired_updated_at
    )
    if not remote_wins or remote.desired == local.desired:
        return Shadow(
            device=local.device,
            version=max(local.version, remote.version),
            desired=local.desired,
            reported=local.reported,
            created_at=local.created_at,
            updated_at=local.updated_at,
            desired_updated_at=local.desired_updated_at,
            reported_updated_at=local.reported_updated_at,
        )
    return Shadow(
        device=local.device,
        version=max(local.version, remote.version) + 1,
        desired=dict(remote.desired),
        reported=local.reported,
        created_at=local.created_at or remote.created_at,
        updated_at=max(local.updated_at, remote.updated_at),
        desired_updated_at=remote.desired_updated_at,
        reported_updated_at=local.reported_updated_at,
    )


class ShadowStore:
    """Shadows persisted in the device database; writes are compare-and-set on version."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        conn.execute(
            "CREATE TABLE IF NOT EXISTS shadows ("
            " device TEXT PRIMARY KEY, version INTEGER NOT NULL, doc TEXT NOT NULL)"
        )

    def get(self, device: str) -> Shadow:
        row = self._conn.execute("SELECT doc FROM shadows WHERE device = ?", (device,)).fetchone()
        if row is None:
            return Shadow(device=device)
        return Shadow.from_json(json.loads(row[0]))

    def put(self, shadow: Shadow, *, previous_version: int) -> None:
        """Store ``shadow`` if the stored version is still ``previous_version``."""
        doc = json.dumps(shadow.to_json(), separators=(",", ":"))
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            cur = self._conn.execute(
                "UPDATE shadows SET version = ?, doc = ? WHERE device = ? AND version = ?",
                (shadow.version, doc, shadow.device, previous_version),
            )
            if cur.rowcount == 0:
                row = self._conn.execute(
                    "SELECT version FROM shadows WHERE device = ?", (shadow.device,)
                ).fetchone()
                if row is not None or previous_version != 0:
                    current = int(row[0]) if row is not None else 0
                    raise ShadowConflict(shadow.device, previous_version, current)
                self._conn.execute(
                    "INSERT INTO shadows (device, version, doc) VALUES (?, ?, ?)",
                    (shadow.device, shadow.version, doc),
                )
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def update(
        self,
        device: str,
        *,
        desired: Mapping[str, Any] | None = None,
        reported: Mapping[str, Any] | None = None,
        expected_version: int | None = None,
        now: float,
    ) -> Shadow:
        """Read, apply, compare-and-set; returns the stored shadow."""
        current = self.get(device)
        new = apply_update(
            current,
            desired=desired,
            reported=reported,
            expected_version=expected_version,
            now=now,
        )
        self.put(new, previous_version=current.version)
        return new

    def delete(self, device: str) -> None:
        self._conn.execute("DELETE FROM shadows WHERE device = ?", (device,))

    def devices(self) -> list[str]:
        return [r[0] for r in self._conn.execute("SELECT device FROM shadows ORDER BY device")]

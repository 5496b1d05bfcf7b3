"""A migration machine's durable snapshot (what a restart needs) and its status view.

Kept apart from :mod:`.machine` so the machine holds only its decisions. The snapshot is
versioned; :func:`restore` refuses a version it does not know rather than guess.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Final

from edgevisor.migration.commands import Cause, MigrationSpec, MigrationStatus, Mode, Phase

if TYPE_CHECKING:
    from edgevisor.migration.machine import Migration

__all__ = ["FORMAT_VERSION", "durable", "note_progress", "restore", "spec_of", "status_of"]

FORMAT_VERSION: Final = 1
_EWMA_WEIGHT: Final = 0.3  # of the newest sample in the fill rate behind the ETA


def durable(m: Migration) -> dict[str, Any]:
    """The state a restart needs (without the sequence counter and the rate)."""
    spec = asdict(m.spec)
    spec["mode"] = str(m.spec.mode)
    return {
        "version": FORMAT_VERSION,
        "spec": spec,
        "phase": str(m.phase),
        "step": m.step,
        "cause": str(m.cause) if m.cause is not None else None,
        "reason": m.reason,
        "effects": sorted(m.effects),
        "leftovers": sorted(m.leftovers),
        "source_up": m.source_up,
        "target_up": m.target_up,
        "source_current": m.source_current,
        "released": m.released,
        "quiesce_at": m.quiesce_at,
        "downtime_s": m.downtime_s,
        # Progress is durable too, so a restart never shows it going backwards.
        "present_bytes": m.present_bytes,
        "total_bytes": m.total_bytes,
    }


def spec_of(d: Mapping[str, Any]) -> MigrationSpec:
    """The spec of a snapshot (after checking its version)."""
    if d.get("version") != FORMAT_VERSION:
        raise ValueError(f"unknown migration snapshot version {d.get('version')!r}")
    raw = dict(d["spec"])
    raw["mode"] = Mode(raw["mode"])
    return MigrationSpec(**raw)


def restore(m: Migration, d: Mapping[str, Any]) -> None:
    """Put the snapshot's state into ``m`` (a machine new from the snapshot's spec)."""
    m.phase = Phase(d["phase"])
    m.step = int(d["step"])
    m.cause = Cause(d["cause"]) if d["cause"] is not None else None
    m.reason = d["reason"]
    m.effects = set(d["effects"])
    m.leftovers = set(d["leftovers"])
    m.source_up = bool(d["source_up"])
    m.target_up = bool(d["target_up"])
    m.source_current = bool(d["source_current"])
    m.released = bool(d["released"])
    m.quiesce_at = d["quiesce_at"]
    m.downtime_s = d["downtime_s"]
    m.next_seq = int(d["next_seq"])
    m.present_bytes = int(d["present_bytes"])
    m.total_bytes = int(d["total_bytes"])
    m.rate_bytes_s = d["rate_bytes_s"]


def status_of(m: Migration) -> MigrationStatus:
    """What ``domain show`` and the events report: phase, progress, ETA, downtime."""
    remaining = max(m.total_bytes - m.present_bytes, 0)
    eta = None
    if remaining == 0:
        eta = 0.0
    elif m.rate_bytes_s:
        eta = remaining / m.rate_bytes_s
    return MigrationStatus(
        migration_id=m.spec.migration_id,
        domain=m.spec.domain,
        phase=m.phase,
        present_bytes=m.present_bytes,
        total_bytes=m.total_bytes,
        rate_bytes_s=m.rate_bytes_s,
        eta_s=eta,
        downtime_s=m.downtime_s,
        blocked_on=m.blocked_on,
        cause=m.cause,
        reason=m.reason,
        settled=m.settled,
    )


def note_progress(m: Migration, present_bytes: int, total_bytes: int, now: float) -> None:
    """A fill progress report: bytes present never go backwards; the rate (for the ETA) is
    an exponentially weighted mean over the reports that gained bytes."""
    if total_bytes > 0:
        m.total_bytes = max(m.total_bytes, total_bytes)
    present = min(max(present_bytes, m.present_bytes), m.total_bytes)
    if m.last_progress is not None:
        t0, p0 = m.last_progress
        if now > t0 and present > p0:
            inst = (present - p0) / (now - t0)
            m.rate_bytes_s = (
                inst
                if m.rate_bytes_s is None
                else (1 - _EWMA_WEIGHT) * m.rate_bytes_s + _EWMA_WEIGHT * inst
            )
    if m.last_progress is None or present > m.last_progress[1]:
        m.last_progress = (now, present)
    m.present_bytes = present

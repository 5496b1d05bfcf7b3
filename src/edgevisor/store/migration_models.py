"""Controller-side migration table: one row per migration, its machine state write-ahead.

``state`` is :meth:`edgevisor.migration.machine.Migration.to_dict` as last persisted (the
runner stores it at every ``PersistPhase`` before performing the batch's commands), so a
restarted controller rebuilds the machine with ``from_dict`` and resumes or rolls back.
The other columns repeat what listing and admission need without decoding ``state``:
``settled`` rows are history; at most one unsettled row per domain (the runner admits a
new one only when none exists).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Float, ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from edgevisor.store.base import Base


class MigrationRecord(Base):
    __tablename__ = "migrations"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    domain: Mapped[str] = mapped_column(String(63), index=True)
    source: Mapped[str] = mapped_column(String(63))
    target: Mapped[str] = mapped_column(String(63))
    mode: Mapped[str] = mapped_column(String(16))
    phase: Mapped[str] = mapped_column(String(16))
    settled: Mapped[bool] = mapped_column(Boolean, default=False, index=True)
    volume_bytes: Mapped[int] = mapped_column(BigInteger)
    state: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)

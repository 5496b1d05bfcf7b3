"""Controller-side task tables: bundles by content digest, and each account's tasks.

The agent keeps its own copy of the bundles it runs; the controller keeps every bundle so
a host that joins later, or is rebuilt, can be given the same bytes.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, Float, ForeignKey, Integer, LargeBinary, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from edgevisor.store.base import Base


class Bundle(Base):
    __tablename__ = "bundles"

    digest: Mapped[str] = mapped_column(String(64), primary_key=True)
    size_bytes: Mapped[int] = mapped_column(Integer)
    data: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[float] = mapped_column(Float)


class Task(Base):
    __tablename__ = "tasks"
    __table_args__ = (UniqueConstraint("account_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(63))
    version: Mapped[str] = mapped_column(String(64))
    bundle_digest: Mapped[str] = mapped_column(ForeignKey("bundles.digest"))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    overrides: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    hosts: Mapped[list[str]] = mapped_column(JSON, default=list)
    deployed_at: Mapped[float] = mapped_column(Float)

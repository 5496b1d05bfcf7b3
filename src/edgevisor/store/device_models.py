"""Controller-side tables of coordinated devices: devices, routes, timers, shadows,
messages taken in from agents' spools, and versioned deployments.

The agent is the authority for what runs on a host (it keeps working offline); these rows
are the controller's record of what each account asked for, plus the last copy of each
shadow an agent synced. Names are the account's own (``sensor1``); on the agent they are
qualified (``acme.sensor1``, see :mod:`edgevisor.agent.devices`).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from edgevisor.store.base import Base


class DeviceRow(Base):
    __tablename__ = "devices"
    __table_args__ = (UniqueConstraint("account_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(63))
    host: Mapped[str] = mapped_column(String(63))
    created_at: Mapped[float] = mapped_column(Float)


class RouteRow(Base):
    __tablename__ = "device_routes"
    __table_args__ = (UniqueConstraint("account_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(63))
    host: Mapped[str] = mapped_column(String(63))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(Float)


class TimerRow(Base):
    __tablename__ = "device_timers"
    __table_args__ = (UniqueConstraint("account_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(63))
    host: Mapped[str] = mapped_column(String(63))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(Float)


class ShadowRow(Base):
    """The controller's copy of a shadow; ``pending`` = changed here, not yet on the agent."""

    __tablename__ = "device_shadows"
    __table_args__ = (UniqueConstraint("account_id", "device"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    device: Mapped[str] = mapped_column(String(63))
    version: Mapped[int] = mapped_column(Integer)
    doc: Mapped[dict[str, Any]] = mapped_column(JSON)
    pending: Mapped[int] = mapped_column(Integer, default=0)
    synced_at: Mapped[float] = mapped_column(Float)


class DeviceMessage(Base):
    """An item an agent spooled for the controller (a routed message or a shadow change).

    ``(host, seq, spooled_at)`` identifies an item: delivery is at-least-once, so a
    re-sent batch is recognised and not stored twice.
    """

    __tablename__ = "device_messages"
    __table_args__ = (
        UniqueConstraint("host", "seq", "spooled_at"),
        Index("ix_device_messages_account", "account_id", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    host: Mapped[str] = mapped_column(String(63))
    seq: Mapped[int] = mapped_column(Integer)
    account_id: Mapped[int | None] = mapped_column(
        ForeignKey("accounts.id", ondelete="CASCADE"), nullable=True
    )
    kind: Mapped[str] = mapped_column(String(16))
    body: Mapped[dict[str, Any]] = mapped_column(JSON)
    spooled_at: Mapped[float] = mapped_column(Float)
    received_at: Mapped[float] = mapped_column(Float)


class Deployment(Base):
    """One version of an account's deployment to one host.

    ``state``: pending -> applying -> succeeded | failed (rolled back) | cancelled.
    ``steps`` is the agent's per-step report; ``failed_step`` names the step that failed.
    """

    __tablename__ = "deployments"
    __table_args__ = (UniqueConstraint("account_id", "host", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    host: Mapped[str] = mapped_column(String(63))
    version: Mapped[int] = mapped_column(Integer)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(16))
    steps: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    failed_step: Mapped[str | None] = mapped_column(String(200), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)

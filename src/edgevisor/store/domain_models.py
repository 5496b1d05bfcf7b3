"""Controller-side domain table: where each account's domains run and what state they are in.

``phase`` is the last phase the controller saw on the host (the agent owns the truth and
reports it on every call); ``desired`` is what the user asked for. ``role`` is the
domain's volume role on ``host`` (``primary``; the migration engine adds ``secondary``
copies on a source while it syncs). ``address`` is where the domain is reached: its
logical address when it has one (``network`` and ``address_record_id`` set: the address
record of the account's network that the domain's instance is bound to), else the test
address its host gave it.
"""

from __future__ import annotations

from sqlalchemy import JSON, BigInteger, Float, ForeignKey, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from edgevisor.store.base import Base


class Domain(Base):
    __tablename__ = "domains"
    __table_args__ = (UniqueConstraint("account_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(63))
    host: Mapped[str] = mapped_column(String(63), index=True)
    command: Mapped[list[str]] = mapped_column(JSON)
    volume: Mapped[str] = mapped_column(String(128))
    volume_size_bytes: Mapped[int] = mapped_column(BigInteger)
    restart: Mapped[str] = mapped_column(String(16))
    memory_mb: Mapped[int] = mapped_column(Integer)
    cpu: Mapped[float] = mapped_column(Float)
    role: Mapped[str] = mapped_column(String(16), default="primary")
    phase: Mapped[str] = mapped_column(String(16), default="stopped")
    desired: Mapped[str] = mapped_column(String(16), default="running")
    restart_count: Mapped[int] = mapped_column(Integer, default=0)
    address: Mapped[str | None] = mapped_column(String(64), default=None)
    # the logical address: the account's network and the address record bound to the
    # domain's instance (None: the domain has only its host's test address)
    network: Mapped[str | None] = mapped_column(String(63), default=None)
    address_record_id: Mapped[int | None] = mapped_column(Integer, default=None)
    env: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    # the app files (a .tar.gz in ``bundles``), kept so the domain can be created again on
    # another host (migration) or a rebuilt one
    app_digest: Mapped[str | None] = mapped_column(ForeignKey("bundles.digest"), default=None)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)

"""Controller-side volume table: which account's volume lives on which host.

The agent that holds a volume is the truth about its bytes (present, lazy progress); the
controller keeps what it decided: the name in the account, the host, the size, and the
one peer host the volume is exported to (at most one at a time).
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Float, ForeignKey, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from edgevisor.store.base import Base


class VolumeRecord(Base):
    __tablename__ = "volumes"
    __table_args__ = (UniqueConstraint("account_id", "name", name="uq_volumes_account_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(63))
    host: Mapped[str] = mapped_column(String(63), index=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    block_size: Mapped[int] = mapped_column(Integer)
    exported_to: Mapped[str | None] = mapped_column(String(63), default=None)
    created_at: Mapped[float] = mapped_column(Float)

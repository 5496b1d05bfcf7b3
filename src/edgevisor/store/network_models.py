"""Tables of capability 3: networks, physical pools, address records, history, host state.

Guarantees come from the schema, so they hold under concurrent transactions on SQLite and
PostgreSQL alike:

- ``uq(account, logical)``: one logical address of an account (hence of each of its
  networks) is never held by two records;
- unique ``(physical_pool_id, physical)``: one physical address is never in two records;
- unique ``instance``: an instance has at most one record;
- the record has one ``host`` column: it names exactly one host at any time (fencing);
- updates are compare-and-set on ``generation`` (``UPDATE ... WHERE generation = :old``).

Allocation state for O(1) allocation: a cursor (``next_offset``) on the network or pool,
plus a free-list table ordered by insertion. The cursor moves one step per allocation, so
it fits a 64-bit integer even in an IPv6 /64 (whose offsets do not); ``cursor_limit`` is
``min(size, 2**62)``. Addresses themselves are stored as canonical text.

``account`` is a plain string here; the lead adds the foreign key to ``accounts.name`` when
the accounts model joins this metadata.

Timestamps are stored as naive UTC and returned as aware UTC (:class:`UTCDateTime`), so
SQLite string comparisons and PostgreSQL comparisons order the same way.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from edgevisor.store.base import Base

__all__ = [
    "AddressHistory",
    "AddressRecordRow",
    "HostApplied",
    "Network",
    "NetworkFreeAddress",
    "PhysicalFreeAddress",
    "PhysicalPool",
    "UTCDateTime",
]

_ADDR = 45  # longest textual IPv6 address (with embedded IPv4)
_NAME = 64
_STATES = "'allocated', 'bound', 'preserved', 'held', 'released'"


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in, naive UTC stored, aware UTC out."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given; pass an aware UTC datetime")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC)


class Network(Base):
    """An account's network of logical addresses (one CIDR)."""

    __tablename__ = "networks"
    __table_args__ = (
        UniqueConstraint("account", "name"),
        CheckConstraint("family IN (4, 6)", name="family"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account: Mapped[str] = mapped_column(String(_NAME), index=True)
    name: Mapped[str] = mapped_column(String(_NAME))
    cidr: Mapped[str] = mapped_column(String(_ADDR + 4))
    family: Mapped[int] = mapped_column(SmallInteger)
    gateway: Mapped[str | None] = mapped_column(String(_ADDR))
    reserve_edges: Mapped[bool] = mapped_column(Boolean, default=True)
    next_offset: Mapped[int] = mapped_column(BigInteger, default=0)
    cursor_limit: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class PhysicalPool(Base):
    """The physical addresses hosts of one host group use between them (per family)."""

    __tablename__ = "physical_pools"
    __table_args__ = (
        UniqueConstraint("host_group", "family"),
        CheckConstraint("family IN (4, 6)", name="family"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    host_group: Mapped[str] = mapped_column(String(_NAME))
    cidr: Mapped[str] = mapped_column(String(_ADDR + 4))
    family: Mapped[int] = mapped_column(SmallInteger)
    gateway: Mapped[str | None] = mapped_column(String(_ADDR))
    reserve_edges: Mapped[bool] = mapped_column(Boolean, default=True)
    next_offset: Mapped[int] = mapped_column(BigInteger, default=0)
    cursor_limit: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class NetworkFreeAddress(Base):
    """Free-list of a network: returned logical addresses, oldest (lowest id) first."""

    __tablename__ = "network_free_addresses"
    __table_args__ = (
        UniqueConstraint("network_id", "address"),
        Index("ix_network_free_addresses_order", "network_id", "id"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    network_id: Mapped[int] = mapped_column(ForeignKey("networks.id", ondelete="CASCADE"))
    address: Mapped[str] = mapped_column(String(_ADDR))


class PhysicalFreeAddress(Base):
    """Free-list of a physical pool, oldest first."""

    __tablename__ = "physical_free_addresses"
    __table_args__ = (
        UniqueConstraint("pool_id", "address"),
        Index("ix_physical_free_addresses_order", "pool_id", "id"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    pool_id: Mapped[int] = mapped_column(ForeignKey("physical_pools.id", ondelete="CASCADE"))
    address: Mapped[str] = mapped_column(String(_ADDR))


class AddressRecordRow(Base):
    """A network address record: logical <-> physical on one host, with a generation."""

    __tablename__ = "address_records"
    __table_args__ = (
        # One logical address per account (so per network: an account's networks do not
        # overlap); the allocation path relies on this key for ON CONFLICT DO NOTHING.
        UniqueConstraint("account", "logical"),
        # Partial indexes: rows without a physical address / instance / host / hold are
        # not indexed, so an allocation writes two B-trees of this table, not six.
        Index(
            "uq_address_records_physical", "physical_pool_id", "physical", unique=True,
            sqlite_where=text("physical IS NOT NULL"),
            postgresql_where=text("physical IS NOT NULL"),
        ),
        Index(
            "uq_address_records_instance", "instance", unique=True,
            sqlite_where=text("instance IS NOT NULL"),
            postgresql_where=text("instance IS NOT NULL"),
        ),
        Index(
            "ix_address_records_host", "host",
            sqlite_where=text("host IS NOT NULL"), postgresql_where=text("host IS NOT NULL"),
        ),
        Index(
            "ix_address_records_missing", "missing_since",
            sqlite_where=text("missing_since IS NOT NULL"),
            postgresql_where=text("missing_since IS NOT NULL"),
        ),
        Index(
            "ix_address_records_held", "held_until",
            sqlite_where=text("state = 'held'"), postgresql_where=text("state = 'held'"),
        ),
        CheckConstraint(f"state IN ({_STATES})", name="state"),
        CheckConstraint("generation >= 1", name="generation"),
        # A bound record has exactly one host, instance and physical address; others none.
        CheckConstraint(
            "(state = 'bound' AND host IS NOT NULL AND instance IS NOT NULL "
            "AND physical IS NOT NULL) OR (state <> 'bound' AND host IS NULL "
            "AND physical IS NULL)",
            name="bound_fields",
        ),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account: Mapped[str] = mapped_column(String(_NAME))
    network_id: Mapped[int] = mapped_column(ForeignKey("networks.id", ondelete="RESTRICT"))
    logical: Mapped[str] = mapped_column(String(_ADDR))
    physical_pool_id: Mapped[int | None] = mapped_column(
        ForeignKey("physical_pools.id", ondelete="RESTRICT")
    )
    physical: Mapped[str | None] = mapped_column(String(_ADDR))
    host: Mapped[str | None] = mapped_column(String(_NAME))
    instance: Mapped[str | None] = mapped_column(String(128))
    state: Mapped[str] = mapped_column(String(16))
    generation: Mapped[int] = mapped_column(Integer, default=1)
    held_until: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # Leak collection: when the record's host first reported its instance missing, and the
    # generation seen then (a later change of the record cancels the suspicion).
    missing_since: Mapped[datetime | None] = mapped_column(UTCDateTime())
    missing_generation: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class AddressHistory(Base):
    """Append-only history of address records; no foreign keys, so it outlives them."""

    __tablename__ = "address_history"
    __table_args__ = (
        Index("ix_address_history_address", "account", "address", "id"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    record_id: Mapped[int] = mapped_column(Integer)
    account: Mapped[str] = mapped_column(String(_NAME))
    network_id: Mapped[int] = mapped_column(Integer)
    address: Mapped[str] = mapped_column(String(_ADDR))
    event: Mapped[str] = mapped_column(String(32))
    from_state: Mapped[str | None] = mapped_column(String(16))
    to_state: Mapped[str] = mapped_column(String(16))
    instance: Mapped[str | None] = mapped_column(String(128))
    host: Mapped[str | None] = mapped_column(String(_NAME))
    physical: Mapped[str | None] = mapped_column(String(_ADDR))
    generation: Mapped[int] = mapped_column(Integer)
    at: Mapped[datetime] = mapped_column(UTCDateTime())


class HostApplied(Base):
    """The generation of a record a host last applied, and its last apply error."""

    __tablename__ = "address_host_applied"

    record_id: Mapped[int] = mapped_column(
        ForeignKey("address_records.id", ondelete="CASCADE"), primary_key=True
    )
    host: Mapped[str] = mapped_column(String(_NAME), primary_key=True)
    generation: Mapped[int] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    at: Mapped[datetime] = mapped_column(UTCDateTime())

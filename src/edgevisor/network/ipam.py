"""Pure IP address management: pools, reservations and O(1) allocation. No I/O.

Theory of operation
-------------------
A pool is a CIDR. Addresses are named by their *offset* from the network address
(``0 .. size-1``), so IPv4 and IPv6 share one algorithm. A few offsets are *reserved* and
never handed out: the network address, the IPv4 broadcast address, and the gateway when
one is configured.

Allocation state is a *cursor* plus a FIFO *free-list*:

- the cursor is the lowest offset never handed out by the cursor; everything below it is
  reserved, in use, or on the free-list (or was taken by a specific request);
- a released address goes to the back of the free-list (FIFO: the address that has been
  free longest is reused first, which keeps quick reuse of an address rare);
- "any address" takes the cursor first (fresh addresses before reused ones), then the
  front of the free-list; both are O(1) in the pool size. Skipping reserved offsets is
  bounded by their number (at most 3);
- a *specific* request above the cursor is recorded in ``ahead``; when the cursor reaches
  such an offset it skips it (amortised O(1): each specific request is skipped once).

A bitmap would need ``size`` bits, which is impossible for an IPv6 /64; the cursor and
free-list need memory proportional to the addresses actually returned, not to the pool.

The same algorithm runs persisted in the store (:mod:`edgevisor.network.records`): a cursor
column on the network, a free-list table, and the unique constraint on the address table
in the role of ``ahead``. :class:`AddressPool` is the arithmetic both share.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from edgevisor.errors import Conflict, RequestError, ResourceExhausted

__all__ = [
    "FIRST_HOST",
    "AddressPool",
    "Allocator",
    "IpAddress",
    "IpNetwork",
    "IpamSettings",
    "PoolExhausted",
    "parse_network",
]

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: ``gateway=FIRST_HOST``: reserve the first address after the network address.
FIRST_HOST: Literal["first"] = "first"


class IpamSettings(BaseModel):
    """Limits on the networks accounts may create, and the address lifecycle timings."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_prefix_v4: int = Field(
        8, ge=0, le=32, description="Largest IPv4 network accepted, as a prefix length (/8)."
    )
    max_prefix_v4: int = Field(
        30, ge=0, le=32, description="Smallest IPv4 network accepted, as a prefix length (/30)."
    )
    min_prefix_v6: int = Field(
        48, ge=0, le=128, description="Largest IPv6 network accepted, as a prefix length (/48)."
    )
    max_prefix_v6: int = Field(
        126, ge=0, le=128, description="Smallest IPv6 network accepted, as a prefix length."
    )
    hold_down_s: float = Field(
        300.0,
        ge=0,
        description=(
            "Seconds a released address stays held before it returns to the free pool "
            "(peers may still cache it). 0: free at once."
        ),
    )
    leak_grace_s: float = Field(
        600.0,
        ge=0,
        description=(
            "Seconds a bound address whose instance its host no longer reports must stay "
            "missing before leak collection releases it."
        ),
    )


class PoolExhausted(ResourceExhausted):
    """No free address is left in a pool; ``details`` name the pool, its CIDR and size."""

    code = "address_pool_exhausted"


def parse_network(cidr: str, settings: IpamSettings | None = None) -> IpNetwork:
    """Parse and validate a CIDR (host bits must be zero) against the size limits."""
    try:
        net = ipaddress.ip_network(cidr.strip(), strict=True)
    except ValueError as exc:
        raise RequestError(f"invalid CIDR {cidr!r}: {exc}") from exc
    if settings is not None:
        lo, hi = (
            (settings.min_prefix_v4, settings.max_prefix_v4)
            if net.version == 4
            else (settings.min_prefix_v6, settings.max_prefix_v6)
        )
        if net.prefixlen < lo:
            raise RequestError(
                f"CIDR {net} is too large: IPv{net.version} networks may be at most /{lo}"
            )
        if net.prefixlen > hi:
            raise RequestError(
                f"CIDR {net} is too small: IPv{net.version} networks must be at least /{hi}"
            )
    return net


@dataclass(frozen=True)
class AddressPool:
    """Offset arithmetic and reservations of one CIDR. Immutable and cheap to share."""

    network: IpNetwork
    gateway: IpAddress | None
    reserved: frozenset[int]
    name: str = ""

    @classmethod
    def create(
        cls,
        cidr: str | IpNetwork,
        *,
        gateway: str | None = FIRST_HOST,
        reserve_edges: bool = True,
        name: str = "",
    ) -> AddressPool:
        """Build a pool. ``gateway``: ``"first"``, ``None`` or an address in the network.

        ``reserve_edges`` reserves the network address (and the IPv4 broadcast address);
        IPv4 /31 and /32 have no such addresses (RFC 3021).
        """
        net = cidr if not isinstance(cidr, str) else parse_network(cidr)
        size = net.num_addresses
        reserved: set[int] = set()
        if reserve_edges and size > 2:
            reserved.add(0)
            if net.version == 4:
                reserved.add(size - 1)
        gw: IpAddress | None = None
        if gateway == FIRST_HOST:
            first = 1 if 0 in reserved else 0
            if first >= size or len(reserved) + 1 >= size:
                raise RequestError(f"network {net} has no room for a gateway address")
            gw = net.network_address + first
            reserved.add(first)
        elif gateway is not None:
            try:
                gw = ipaddress.ip_address(gateway)
            except ValueError as exc:
                raise RequestError(f"invalid gateway address {gateway!r}: {exc}") from exc
            if gw not in net:
                raise RequestError(f"gateway {gw} is outside network {net}")
            reserved.add(int(gw) - int(net.network_address))
        return cls(network=net, gateway=gw, reserved=frozenset(reserved), name=name or str(net))

    @property
    def size(self) -> int:
        return self.network.num_addresses

    @property
    def assignable(self) -> int:
        return self.size - len(self.reserved)

    @property
    def family(self) -> int:
        return self.network.version

    def address_at(self, offset: int) -> IpAddress:
        if not 0 <= offset < self.size:
            raise ValueError(f"offset {offset} outside {self.network}")
        return self.network.network_address + offset

    def offset_of(self, address: str | IpAddress) -> int:
        """Offset of ``address``; RequestError if it is invalid or outside the pool."""
        try:
            addr = ipaddress.ip_address(address) if isinstance(address, str) else address
        except ValueError as exc:
            raise RequestError(f"invalid address {address!r}: {exc}") from exc
        if addr.version != self.network.version or addr not in self.network:
            raise RequestError(f"address {addr} is outside network {self.network}")
        return int(addr) - int(self.network.network_address)

    def check_assignable(self, offset: int) -> None:
        """RequestError if ``offset`` is a reserved address."""
        if offset in self.reserved:
            addr = self.address_at(offset)
            what = "the gateway" if addr == self.gateway else "reserved (network/broadcast)"
            raise RequestError(f"address {addr} of network {self.network} is {what}")

    def advance(self, cursor: int) -> tuple[int | None, int]:
        """Next cursor offset: ``(offset, new_cursor)``; ``(None, size)`` when exhausted.

        Skips reserved offsets only, so it runs at most ``len(reserved) + 1`` steps.
        """
        while cursor < self.size:
            offset, cursor = cursor, cursor + 1
            if offset not in self.reserved:
                return offset, cursor
        return None, cursor

    def exhausted(self, in_use: int | None = None) -> PoolExhausted:
        used = f"{in_use} in use or held, " if in_use is not None else ""
        return PoolExhausted(
            f"address pool {self.name!r} ({self.network}) is exhausted: {used}"
            f"{self.assignable} assignable of {self.size} addresses",
            details={
                "pool": self.name,
                "cidr": str(self.network),
                "size": self.size,
                "assignable": self.assignable,
            },
        )


@dataclass
class Allocator:
    """In-memory allocator over one :class:`AddressPool` (cursor + FIFO free-list).

    The store keeps the same state in tables; this class is the reference the property
    tests check, and is usable on its own where no store is needed (e.g. per-host pools).
    """

    pool: AddressPool
    cursor: int = 0
    free: OrderedDict[int, None] = field(default_factory=OrderedDict)
    ahead: set[int] = field(default_factory=set)
    in_use: set[int] = field(default_factory=set)

    def allocate(self) -> IpAddress:
        """Any free address: a fresh one from the cursor, else the longest-free one."""
        while True:
            offset, self.cursor = self.pool.advance(self.cursor)
            if offset is None:
                break
            if offset in self.ahead:
                self.ahead.discard(offset)  # taken by a specific request earlier
                continue
            self.in_use.add(offset)
            return self.pool.address_at(offset)
        if self.free:
            offset, _ = self.free.popitem(last=False)
            self.in_use.add(offset)
            return self.pool.address_at(offset)
        raise self.pool.exhausted(len(self.in_use))

    def allocate_specific(self, address: str | IpAddress) -> IpAddress:
        """Exactly ``address``; Conflict if in use, RequestError if reserved or outside."""
        offset = self.pool.offset_of(address)
        self.pool.check_assignable(offset)
        if offset in self.in_use:
            raise Conflict(f"address {self.pool.address_at(offset)} is already allocated")
        if offset >= self.cursor:
            self.ahead.add(offset)
        else:
            self.free.pop(offset, None)
        self.in_use.add(offset)
        return self.pool.address_at(offset)

    def release(self, address: str | IpAddress) -> None:
        """Return ``address``; Conflict if it is not allocated (a double release)."""
        offset = self.pool.offset_of(address)
        if offset not in self.in_use:
            raise Conflict(f"address {self.pool.address_at(offset)} is not allocated")
        self.in_use.discard(offset)
        if offset in self.ahead:
            # Above the cursor and never reached: the cursor will hand it out in turn.
            self.ahead.discard(offset)
        else:
            self.free[offset] = None

    @property
    def available(self) -> int:
        return self.pool.assignable - len(self.in_use)

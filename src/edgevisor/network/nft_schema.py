"""How nf_tables stores the keys and data of the dataplane's sets: one layout per set.

The layouts come from the same declarations the tables are made from
(:data:`~edgevisor.network.dp_core._MAPS`, ``_MAPS6``), so a set added there is either
encoded correctly or refused (:class:`UnsupportedBatch`, then the batch goes as text
through libnftables); a layout is never guessed. Byte order per type is what nft itself
sends (see :mod:`~edgevisor.network.nft_netlink`).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from socket import AF_INET, AF_INET6, inet_pton

from edgevisor.network.dp_core import _MAPS, _MAPS6, FENCE_DECLS

__all__ = ["SCHEMAS", "Field", "SetSchema", "UnsupportedBatch", "parse_declaration", "schemas"]

# Netlink attributes of one element (kernel ``include/uapi/linux/netfilter/nf_tables.h``).
NLA_F_NESTED = 0x8000
NFTA_SET_ELEM_KEY = 1
NFTA_SET_ELEM_DATA = 2
NFTA_SET_ELEM_KEY_END = 10
NFTA_DATA_VALUE = 1
_NLA = struct.Struct("=HH")


class UnsupportedBatch(ValueError):
    """The batch holds a set or a key the encoder does not know: use the text path."""


# --- key fields --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Field:
    """One field of a key or of map data: its size and how a text value becomes bytes
    (``parse``), and in an interval set (``parse_interval``: nft stores host-endian
    fields big-endian there)."""

    kind: str
    size: int
    parse: Callable[[str], bytes]
    parse_interval: Callable[[str], bytes]


def _ifname(text: str) -> bytes:
    name = text.strip('"').encode()
    if len(name) > 15 or b"\0" in name:  # IFNAMSIZ is 16 with the NUL
        raise UnsupportedBatch(f"interface name {text!r} is not a plain name")
    return name.ljust(16, b"\0")


def _uint(fmt: str) -> Callable[[str], bytes]:
    pack = struct.Struct(fmt).pack

    def parse(text: str) -> bytes:
        return pack(int(text, 0))

    return parse


def _addr(family: int) -> Callable[[str], bytes]:
    def parse(text: str) -> bytes:
        return inet_pton(family, text)

    return parse


_BAD_VALUE = (ValueError, OSError, OverflowError, struct.error)
_ETHERTYPES = {"ip": 0x0800, "ip6": 0x86DD, "arp": 0x0806}


def _ethertype(text: str) -> bytes:
    value = _ETHERTYPES.get(text)
    return (value if value is not None else int(text, 0)).to_bytes(2, "big")


_IPV4 = Field("ipv4_addr", 4, _addr(AF_INET), _addr(AF_INET))
_IPV6 = Field("ipv6_addr", 16, _addr(AF_INET6), _addr(AF_INET6))
_MARK = Field("mark", 4, _uint("=I"), _uint("!I"))
_ZONE = Field("ct zone", 2, _uint("=H"), _uint("!H"))
_IFNAME = Field("ifname", 16, _ifname, _ifname)
_ETHER = Field("ether_type", 2, _ethertype, _ethertype)
# Datatype names (``type``) and expressions (``typeof``) of the table's declarations.
_FIELDS: dict[str, Field] = {
    "ipv4_addr": _IPV4,
    "ip saddr": _IPV4,
    "ip daddr": _IPV4,
    "ct original ip saddr": _IPV4,
    "ct original ip daddr": _IPV4,
    "ipv6_addr": _IPV6,
    "ip6 saddr": _IPV6,
    "ip6 daddr": _IPV6,
    "ct original ip6 saddr": _IPV6,
    "ct original ip6 daddr": _IPV6,
    "mark": _MARK,
    "meta mark": _MARK,
    "ct mark": _MARK,
    "ct zone": _ZONE,
    "ifname": _IFNAME,
    "iifname": _IFNAME,
    "oifname": _IFNAME,
    "ether_type": _ETHER,
    "meta protocol": _ETHER,
}


@dataclass(frozen=True, slots=True)
class _Layout:
    """The constant bytes around the values of one set's elements: every field has a
    fixed size, so only the element's number and its values vary."""

    key_head: bytes  # NFTA_SET_ELEM_KEY { NFTA_DATA_VALUE header
    end_head: bytes  # NFTA_SET_ELEM_KEY_END { NFTA_DATA_VALUE header (interval sets)
    key_pad: bytes
    data_head: bytes  # NFTA_SET_ELEM_DATA { NFTA_DATA_VALUE header (maps)
    data_pad: bytes
    size: int  # of the whole element attribute, with data
    size_nodata: int


def _layout(schema: SetSchema) -> _Layout:
    """The layout of ``schema``'s elements (a concatenation pads each field to 4 bytes)."""
    klen = (
        sum(f.size + (-f.size % 4) for f in schema.key)
        if len(schema.key) > 1
        else schema.key[0].size
    )
    kpad = -klen % 4

    def head(kind: int, n: int) -> bytes:
        return _NLA.pack(8 + n + (-n % 4), kind | NLA_F_NESTED) + _NLA.pack(4 + n, NFTA_DATA_VALUE)

    key_head = head(NFTA_SET_ELEM_KEY, klen)
    end_head = head(NFTA_SET_ELEM_KEY_END, klen) if schema.interval else b""
    size_nodata = 4 + (len(key_head) + klen + kpad) * (2 if schema.interval else 1)
    dlen = schema.data.size if schema.data is not None else 0
    data_head = head(NFTA_SET_ELEM_DATA, dlen) if schema.data is not None else b""
    size = size_nodata + (len(data_head) + dlen + (-dlen % 4) if data_head else 0)
    return _Layout(
        key_head, end_head, b"\0" * kpad, data_head, b"\0" * (-dlen % 4), size, size_nodata
    )


@dataclass(frozen=True, slots=True)
class SetSchema:
    """How elements of one set or map are encoded."""

    name: str
    family: str  # "ip" or "ip6"
    key: tuple[Field, ...]
    data: Field | None = None
    interval: bool = False
    layout: _Layout = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layout", _layout(self))

    def key_bytes(self, text: str) -> tuple[bytes, bytes | None]:
        """(key, key_end) of a rendered key (``a . b . lo-hi``); key_end only in interval
        sets. Raises :class:`UnsupportedBatch` on a key that does not fit the set."""
        try:
            if len(self.key) == 1:
                if self.interval:
                    # One-field interval sets (rbtree) need interval-end elements: unused.
                    raise UnsupportedBatch(f"{self.name}: one-field interval sets are not encoded")
                return self.key[0].parse(text), None
            parts = text.split(" . ")
            if len(parts) != len(self.key):
                raise UnsupportedBatch(
                    f"{self.name}: key {text!r} has {len(parts)} fields, the set {len(self.key)}"
                )
            if not self.interval:
                return b"".join(
                    [_padded(f.parse(p), f.size) for f, p in zip(self.key, parts, strict=True)]
                ), None
            lo, hi = [], []
            for f, p in zip(self.key, parts, strict=True):
                a, sep, b = p.partition("-")
                lo.append(_padded(f.parse_interval(a), f.size))
                hi.append(_padded(f.parse_interval(b), f.size) if sep else lo[-1])
            return b"".join(lo), b"".join(hi)
        except _BAD_VALUE as exc:  # int(), struct, inet_pton()
            if isinstance(exc, UnsupportedBatch):
                raise
            raise UnsupportedBatch(f"{self.name}: key {text!r}: {exc}") from exc

    def data_bytes(self, text: str) -> bytes:
        assert self.data is not None
        try:
            return self.data.parse(text)
        except _BAD_VALUE as exc:
            raise UnsupportedBatch(f"{self.name}: data {text!r}: {exc}") from exc


def _padded(raw: bytes, size: int) -> bytes:
    """A field of a concatenation takes a multiple of 4 bytes (one 32-bit register each)."""
    return raw + b"\0" * (-size % 4) if size % 4 else raw


def parse_declaration(name: str, family: str, decl: str) -> SetSchema:
    """A schema from a set declaration as ``dp_core`` writes it, e.g.
    ``type mark . ipv4_addr : ipv4_addr;`` or ``typeof ct zone . ct original ip saddr .
    ct mark; flags interval;``."""
    clauses = [c.strip() for c in decl.split(";") if c.strip()]
    typ = clauses[0]
    for prefix in ("typeof ", "type "):
        if typ.startswith(prefix):
            typ = typ[len(prefix) :]
            break
    else:
        raise UnsupportedBatch(f"{name}: declaration {decl!r} has no type")
    key_text, _, data_text = typ.partition(" : ")
    try:
        key = tuple(_FIELDS[f.strip()] for f in key_text.split(" . "))
        data = _FIELDS[data_text.strip()] if data_text else None
    except KeyError as exc:
        raise UnsupportedBatch(f"{name}: no encoding for {exc.args[0]!r}") from exc
    interval = any(c.startswith("flags") and "interval" in c for c in clauses[1:])
    return SetSchema(name, family, key, data, interval)


def schemas() -> dict[str, SetSchema]:
    """The schemas of the dataplane's sets: the maps' and the fence's (names and
    declarations as in ``dp_core``)."""
    out: dict[str, SetSchema] = {}
    for family, decls, f, ipx in (("ip", _MAPS, "", "ip"), ("ip6", _MAPS6, "6", "ip6")):
        for name, decl in decls.items():
            out[name] = parse_declaration(name, family, decl)
        for name, decl in FENCE_DECLS.items():
            out[name + f] = parse_declaration(name + f, family, decl.format(ipx=ipx))
    return out


SCHEMAS = schemas()

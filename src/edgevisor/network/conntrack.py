"""Delete the conntrack entries of changed or removed address mappings.

A remap does not move flows that already exist: their conntrack entries keep the old
translation until they time out. So every mapping that changed or went away has its
entries deleted, after the new table is in place; the next packet of such a flow is then
looked up afresh (TCP mid-stream pickup) and meets the new translation (or the drop).

Which entries belong to a mapping is decided by :func:`flush_targets` (pure): in the
record's account zone, every entry whose *original* tuple has the logical or the old
physical address as source or destination. That covers, on any host:

- flows a local instance opened towards the record (orig dst = logical),
- flows the record's instance opened towards a local instance (orig src = physical),
- when the record was local: its own outbound flows (orig src = logical) and inbound
  flows to it (orig dst = physical).

The dataplane fences these flows off in the update's own nftables transaction (their
conntrack mark holds the epoch they were opened in, see ``dataplane.py``), so the flush
is cleanup off the critical path: given the fence's epoch, it deletes only entries opened
up to that epoch (and those whose mark is not an epoch), never a flow opened after the
update.

A flush is ONE ctnetlink dump of the namespace's entries over a raw netlink socket,
matched in Python, then one delete per matching entry. Measured: the kernel walks the
whole machine-wide hash table (``nf_conntrack_buckets``, 262,144 here) on every dump,
filtered or not, ~10 ms; so one dump per update, not one per address. ``conntrack -D``
costs a process start per call; pyroute2 0.9 added ~10 ms per dump.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import Literal

from edgevisor.errors import UnavailableError
from edgevisor.network import netns as _netns

__all__ = ["ConntrackError", "ConntrackFlusher", "FlushTarget", "flush_targets"]


class ConntrackError(UnavailableError):
    """ctnetlink refused a dump or a delete."""

    code = "conntrack_failed"


@dataclass(frozen=True, slots=True, order=True)
class FlushTarget:
    """Delete entries in ``zone`` whose original ``side`` address is ``address``."""

    zone: int
    side: Literal["src", "dst"]
    address: IPv4Address | IPv6Address


def flush_targets(
    zone: int, logical: IPv4Address | IPv6Address, physical: IPv4Address | IPv6Address
) -> set[FlushTarget]:
    """The entries to delete for one old mapping ``logical <-> physical`` in ``zone``."""
    return {
        FlushTarget(zone, side, addr)
        for addr in (logical, physical)
        for side in ("src", "dst")
    }


# ctnetlink constants (linux/netfilter/nfnetlink_conntrack.h)
NETLINK_NETFILTER = 12
_CT_GET = (1 << 8) | 1  # NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_GET
_CT_DELETE = (1 << 8) | 2
_NLM_F_REQUEST, _NLM_F_ACK, _NLM_F_DUMP = 0x1, 0x4, 0x300
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_CTA_TUPLE_ORIG, _CTA_MARK, _CTA_ZONE, _CTA_FILTER = 1, 8, 18, 25
_CTA_TUPLE_IP, _CTA_IP_V4_SRC, _CTA_IP_V4_DST = 1, 1, 2
_CTA_IP_V6_SRC, _CTA_IP_V6_DST = 3, 4
_CTA_FILTER_ORIG_FLAGS = 1
_FILTER_IP_SRC, _FILTER_IP_DST = 1 << 0, 1 << 1
_NLA_F_NESTED = 0x8000
_ENOENT = 2


def _nla(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def _attrs(data: bytes) -> Iterator[tuple[int, bytes, bytes]]:
    """(type, payload, whole attribute bytes) of a netlink attribute stream."""
    off = 0
    while off + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, off)
        if length < 4:
            break
        yield kind & 0x3FFF, data[off + 4:off + length], data[off:off + length]
        off += (length + 3) & ~3


def dump_request(target: FlushTarget | None, seq: int) -> bytes:
    """A ctnetlink dump request: of all entries, or (kernel-side CTA_FILTER, Linux >= 5.8)
    of those whose original tuple has ``target``'s address on its side."""
    body = struct.pack("=BBH", socket.AF_INET, 0, 0)
    if target is not None:
        ip_kind = _CTA_IP_V4_SRC if target.side == "src" else _CTA_IP_V4_DST
        flag = _FILTER_IP_SRC if target.side == "src" else _FILTER_IP_DST
        tuple_ip = _nla(_CTA_TUPLE_IP | _NLA_F_NESTED, _nla(ip_kind, target.address.packed))
        body += _nla(_CTA_TUPLE_ORIG | _NLA_F_NESTED, tuple_ip) + _nla(
            _CTA_FILTER | _NLA_F_NESTED, _nla(_CTA_FILTER_ORIG_FLAGS, struct.pack("=I", flag))
        )
    return struct.pack("=IHHII", 16 + len(body), _CT_GET, _NLM_F_REQUEST | _NLM_F_DUMP,
                       seq, 0) + body


def delete_request(
    tuple_orig_attr: bytes, zone: int, seq: int, family: int = socket.AF_INET
) -> bytes:
    body = struct.pack("=BBH", family, 0, 0) + tuple_orig_attr
    if zone:
        body += _nla(_CTA_ZONE, struct.pack("!H", zone))
    return struct.pack("=IHHII", 16 + len(body), _CT_DELETE, _NLM_F_REQUEST | _NLM_F_ACK,
                       seq, 0) + body


class ConntrackFlusher:
    """Deletes conntrack entries in one network namespace over ctnetlink.

    A raw netlink socket, not pyroute2: pyroute2 0.9's asyncio core cost ~10 ms per dump,
    which alone broke the 5 ms remap budget. A delete copies the original-tuple attribute
    of the dumped entry verbatim.
    """

    def __init__(self, netns: str | None = None) -> None:
        def open_socket() -> socket.socket:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            sock.bind((0, 0))
            return sock

        try:
            self._sock = _netns.call_in(netns, open_socket)
        except OSError as exc:
            raise ConntrackError(f"cannot open ctnetlink: {exc}") from exc
        self._seq = 0

    def close(self) -> None:
        self._sock.close()

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        return self._seq

    def _messages(self, seq: int) -> Iterator[tuple[int, bytes]]:
        """(type, payload) of replies to ``seq`` until DONE or the ACK/error."""
        while True:
            data = self._sock.recv(1 << 20)
            off = 0
            while off + 16 <= len(data):
                length, kind, _flags, mseq, _pid = struct.unpack_from("=IHHII", data, off)
                if length < 16:
                    return
                payload = data[off + 16:off + length]
                off += (length + 3) & ~3
                if mseq != seq:
                    continue
                if kind == _NLMSG_DONE:
                    return
                yield kind, payload
                if kind == _NLMSG_ERROR:
                    return

    def _matches(
        self, bounds: Mapping[FlushTarget, int | None], epoch_limit: int = 0
    ) -> list[tuple[bytes, int, int]]:
        """(original-tuple attribute, zone, family) of every entry matching a target
        (with the target's epoch bound E: and whose mark is not an epoch after it, i.e.
        not in ``(E, epoch_limit)``).

        One dump for all targets: the kernel walks the whole (machine-wide) conntrack hash
        table for every dump, filtered or not, so N filtered dumps cost N walks. With an
        IPv6 target the dump is of every family (AF_UNSPEC), still one walk.
        """
        wanted = {(t.zone, t.side, t.address.packed): e for t, e in bounds.items()}
        v6 = any(t.address.version == 6 for t in bounds)
        seq = self._next_seq()
        req = dump_request(None, seq)
        if v6:  # the family byte follows the 16-byte netlink header
            req = req[:16] + bytes([socket.AF_UNSPEC]) + req[17:]
        self._sock.send(req)
        found: list[tuple[bytes, int, int]] = []
        for kind, payload in self._messages(seq):
            if kind == _NLMSG_ERROR:
                (code,) = struct.unpack_from("=i", payload)
                if code:
                    raise ConntrackError(f"conntrack dump failed: {os.strerror(-code)}")
                continue
            zone = mark = 0
            tuple_orig = b""
            src = dst = b""
            for akind, value, whole in _attrs(payload[4:]):
                if akind == _CTA_ZONE:
                    (zone,) = struct.unpack("!H", value[:2])
                elif akind == _CTA_MARK:
                    (mark,) = struct.unpack("!I", value[:4])
                elif akind == _CTA_TUPLE_ORIG:
                    tuple_orig = whole
                    for tkind, tvalue, _ in _attrs(value):
                        if tkind == _CTA_TUPLE_IP:
                            for ikind, ivalue, _ in _attrs(tvalue):
                                if ikind in (_CTA_IP_V4_SRC, _CTA_IP_V6_SRC):
                                    src = ivalue
                                elif ikind in (_CTA_IP_V4_DST, _CTA_IP_V6_DST):
                                    dst = ivalue
            if not tuple_orig:
                continue
            for key in ((zone, "src", src), (zone, "dst", dst)):
                if key not in wanted:
                    continue
                bound = wanted[key]
                if bound is not None and bound < mark < epoch_limit:
                    continue  # opened after the update: it uses the new mapping
                found.append((tuple_orig, zone, payload[0]))
                break
        return found

    def flush(
        self, targets: Iterable[FlushTarget], *, epoch: int | None = None,
        epoch_limit: int = 0xFFFFFFFF,
    ) -> int:
        """Delete every entry matching one of ``targets``; return how many went. With
        ``epoch``, entries whose conntrack mark is an epoch after it (``epoch < mark <
        epoch_limit``) stay: they were opened after the update that fenced the rest."""
        return self.flush_bounded(dict.fromkeys(targets, epoch), epoch_limit=epoch_limit)

    def flush_bounded(
        self, bounds: Mapping[FlushTarget, int | None], *, epoch_limit: int = 0xFFFFFFFF
    ) -> int:
        """:meth:`flush` with an epoch bound per target (None: every entry of it), so
        that the targets of several updates go in one dump; return how many went."""
        if not bounds:
            return 0
        deleted = 0
        try:
            for tuple_orig, zone, family in self._matches(bounds, epoch_limit):
                seq = self._next_seq()
                self._sock.send(delete_request(tuple_orig, zone, seq, family))
                for _kind, payload in self._messages(seq):
                    (code,) = struct.unpack_from("=i", payload)
                    # ENOENT: it died between dump and delete.
                    if code == 0:
                        deleted += 1
                    elif code != -_ENOENT:
                        raise ConntrackError(f"conntrack delete failed: {os.strerror(-code)}")
        except OSError as exc:
            raise ConntrackError(f"ctnetlink: {exc}") from exc
        return deleted

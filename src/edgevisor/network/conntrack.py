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

The dataplane fences these flows off in the update's own nftables transaction (see "Old
flows" in ``dataplane.py``): a flow's conntrack mark carries a 2-bit *phase* per side
(:data:`PHASE_SHIFT`), the phase its original source (destination) key had when it
opened, and a fence moves the key to the next phase. So a cleanup is exact with one
mark/mask equality per stale phase: in the target's zone, with the target's address on
its side, and with the side's phase equal to the stale one. Flows opened after the fence
carry a later phase and are never deleted.

Two ways to delete, chosen per cleanup (:meth:`ConntrackFlusher.flush_bounded`):

- **Kernel filter** (Linux >= 6.12, the release that let a delete carry ``CTA_FILTER``:
  ``IPCTNL_MSG_CT_DELETE`` with the tuple filter, zone and mark/mask): one request per
  target and stale phase, no entry crosses to user space. The kernel walks the
  machine-wide hash table per request but skips empty buckets: measured here (262,144
  buckets) ~0.12 ms with a near-empty table, +0.23 ms per 1,000 entries (of any
  namespace). A namespace without entries costs nothing (the kernel checks its count).
- **Dump** (the fallback): ONE ctnetlink dump of the namespace's entries, matched here,
  then one delete per match. The dump takes every bucket's lock, filtered or not: ~9 ms
  + ~0.17 ms per 1,000 entries, plus the parsing of the namespace's own entries.

The kernel filter is used for IPv4 targets while it is estimated cheaper than one dump
(several targets on a heavily loaded table are not); IPv6 targets always go through the
dump, because 6.12-6.18 compare IPv6 filter addresses inverted (``ipv6_addr_cmp`` used as
a boolean in ``ctnetlink_filter_match_tuple``: a filtered IPv6 delete removes the entries
whose address *differs*; measured on 6.18). A kernel that refuses the filter (5.8-6.11
answer EOPNOTSUPP, older ones EINVAL) switches the flusher to dumps for good.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import time
from collections.abc import Iterable, Iterator, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import Literal

from edgevisor.errors import UnavailableError
from edgevisor.network import netns as _netns

__all__ = [
    "PHASES",
    "PHASE_SHIFT",
    "ConntrackError",
    "ConntrackFlusher",
    "FlushTarget",
    "delete_request",
    "dump_request",
    "filtered_delete_request",
    "flush_targets",
    "phase_of",
]

Path = Literal["auto", "kernel", "dump"]
#: Where the flow fence keeps a flow's phases in its conntrack mark (see "Old flows" in
#: ``dataplane.py``): the phase (0-3) its original source (destination) key had when it
#: opened, in bits 28-29 (30-31). The marks earlier versions wrote (epochs, far below)
#: have these bits clear, so such flows read as phase 0, as every key starts.
PHASE_SHIFT: dict[Literal["src", "dst"], int] = {"src": 28, "dst": 30}
PHASES = 4


def phase_of(mark: int, side: Literal["src", "dst"]) -> int:
    return (mark >> PHASE_SHIFT[side]) & (PHASES - 1)


#: Per target, the phases whose entries go (None: every entry of the target).
Bounds = Mapping["FlushTarget", AbstractSet[int] | None]


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
_CTA_TUPLE_ORIG, _CTA_MARK, _CTA_ZONE, _CTA_MARK_MASK, _CTA_FILTER = 1, 8, 18, 21, 25
_CTA_TUPLE_IP, _CTA_IP_V4_SRC, _CTA_IP_V4_DST = 1, 1, 2
_CTA_IP_V6_SRC, _CTA_IP_V6_DST = 3, 4
_CTA_FILTER_ORIG_FLAGS = 1
_FILTER_IP_SRC, _FILTER_IP_DST = 1 << 0, 1 << 1
_NLA_F_NESTED = 0x8000
_ENOENT = 2
# Cost model of a dump against filtered walks (measured on 6.18, 2 vCPU): a dump locks
# every bucket (~34 ns each), pays ~0.75x a walk's per-entry cost on top, and each entry
# of the namespace's own crosses to Python to be parsed (~7.5 us).
_DUMP_NS_PER_BUCKET = 34
_DUMP_PER_WALK = 0.75
_DUMP_S_PER_OWN_ENTRY = 7.5e-6


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


def _family(target: FlushTarget) -> int:
    return socket.AF_INET6 if target.address.version == 6 else socket.AF_INET


def _tuple_filter(target: FlushTarget) -> bytes:
    """``CTA_TUPLE_ORIG`` with the target's address on its side, and the ``CTA_FILTER``
    that makes the kernel compare only that field."""
    v6 = target.address.version == 6
    if target.side == "src":
        ip_kind, flag = (_CTA_IP_V6_SRC if v6 else _CTA_IP_V4_SRC), _FILTER_IP_SRC
    else:
        ip_kind, flag = (_CTA_IP_V6_DST if v6 else _CTA_IP_V4_DST), _FILTER_IP_DST
    tuple_ip = _nla(_CTA_TUPLE_IP | _NLA_F_NESTED, _nla(ip_kind, target.address.packed))
    return _nla(_CTA_TUPLE_ORIG | _NLA_F_NESTED, tuple_ip) + _nla(
        _CTA_FILTER | _NLA_F_NESTED, _nla(_CTA_FILTER_ORIG_FLAGS, struct.pack("=I", flag))
    )


def dump_request(target: FlushTarget | None, seq: int) -> bytes:
    """A ctnetlink dump request: of all entries, or (kernel-side CTA_FILTER, Linux >= 5.8)
    of those whose original tuple has ``target``'s address on its side."""
    body = struct.pack("=BBH", socket.AF_INET, 0, 0)
    if target is not None:
        body += _tuple_filter(target)
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


def filtered_delete_request(target: FlushTarget, phase: int | None, seq: int) -> bytes:
    """One kernel-side delete (Linux >= 6.12) of every entry in ``target.zone`` with the
    target's address on its side of the original tuple and, unless ``phase`` is None,
    the side's phase equal to ``phase`` (``CTA_MARK``/``CTA_MARK_MASK``). Without a
    tuple to look up, the kernel runs its flush with this filter."""
    body = struct.pack("=BBH", _family(target), 0, 0) + _tuple_filter(target)
    body += _nla(_CTA_ZONE, struct.pack("!H", target.zone))
    if phase is not None:
        shift = PHASE_SHIFT[target.side]
        body += _nla(_CTA_MARK, struct.pack("!I", phase << shift))
        body += _nla(_CTA_MARK_MASK, struct.pack("!I", (PHASES - 1) << shift))
    return struct.pack("=IHHII", 16 + len(body), _CT_DELETE, _NLM_F_REQUEST | _NLM_F_ACK,
                       seq, 0) + body


class ConntrackFlusher:
    """Deletes conntrack entries in one network namespace over ctnetlink.

    A raw netlink socket, not pyroute2: pyroute2 0.9's asyncio core cost ~10 ms per dump,
    which alone broke the 5 ms remap budget. ``path``: ``"auto"`` (kernel filter for
    IPv4 targets while cheaper than a dump, see the module docstring), ``"kernel"`` (for
    every IPv4 target whatever the estimate) or ``"dump"`` (never the kernel filter).
    """

    def __init__(self, netns: str | None = None, *, path: Path = "auto") -> None:
        def open_socket() -> socket.socket:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            sock.bind((0, 0))
            return sock

        def buckets() -> int:
            try:
                with open("/proc/sys/net/netfilter/nf_conntrack_buckets") as f:
                    return int(f.read())
            except (OSError, ValueError):
                return 262_144

        def count_fd() -> int | None:
            # Opened in the namespace: a net sysctl file stays bound to the opener's.
            try:
                return os.open("/proc/sys/net/netfilter/nf_conntrack_count", os.O_RDONLY)
            except OSError:
                return None

        try:
            self._sock, nbuckets, self._count_fd = _netns.call_in(
                netns, lambda: (open_socket(), buckets(), count_fd()))
        except OSError as exc:
            raise ConntrackError(f"cannot open ctnetlink: {exc}") from exc
        self._seq = 0
        self.path: Path = path
        #: False once the kernel refused a filtered delete (then: dumps only).
        self.kernel_filter = path != "dump"
        #: CPU seconds of the last filtered walk (an estimate first) and of a dump's
        #: bucket locking: the cost model of :meth:`_use_kernel`.
        self.walk_s = 0.12e-3
        self.dump_base_s = nbuckets * _DUMP_NS_PER_BUCKET * 1e-9
        #: How the last flush went: "kernel", "dump", "kernel+dump" or "" (nothing).
        self.last_path = ""

    def close(self) -> None:
        self._sock.close()
        if self._count_fd is not None:
            os.close(self._count_fd)
            self._count_fd = None

    def _count(self) -> int | None:
        """The namespace's conntrack entries (``nf_conntrack_count``), if readable."""
        if self._count_fd is None:
            return None
        try:
            return int(os.pread(self._count_fd, 32, 0))
        except (OSError, ValueError):
            return None

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

    def _matches(self, bounds: Bounds) -> list[tuple[bytes, int, int]]:
        """(original-tuple attribute, zone, family) of every entry matching a target
        (with the target's phases: and whose side's phase is one of them).

        One dump for all targets: the kernel walks the whole (machine-wide) conntrack hash
        table for every dump, filtered or not, so N filtered dumps cost N walks. With an
        IPv6 target the dump is of every family (AF_UNSPEC), still one walk.
        """
        wanted = {(t.zone, t.side, t.address.packed): p for t, p in bounds.items()}
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
            sides: tuple[tuple[Literal["src", "dst"], bytes], ...] = (("src", src), ("dst", dst))
            for side, addr in sides:
                key = (zone, side, addr)
                if key not in wanted:
                    continue
                phases = wanted[key]
                if phases is not None and phase_of(mark, side) not in phases:
                    continue  # opened after the fence: it carries a later phase
                found.append((tuple_orig, zone, payload[0]))
                break
        return found

    def flush(self, targets: Iterable[FlushTarget], *, phase: int | None = None) -> int:
        """Delete every entry matching one of ``targets`` (with ``phase``: only those whose
        side's phase is ``phase``); return how many went."""
        return self.flush_bounded(
            dict.fromkeys(targets, None if phase is None else frozenset({phase})))

    def flush_bounded(self, bounds: Bounds) -> int:
        """Delete the entries of each target whose side's phase is one of the target's
        phases (None: every entry of the target); return how many went (for the kernel
        filter, which does not say, the drop of the namespace's entry count: approximate
        while other flows open or end meanwhile)."""
        if not bounds:
            return 0
        kernel = {t: p for t, p in bounds.items() if t.address.version == 4}
        if not self._use_kernel(sum(len(p) if p is not None else 1 for p in kernel.values())):
            kernel = {}
        rest = {t: p for t, p in bounds.items() if t not in kernel}
        try:
            deleted = 0
            if kernel:
                before = self._count()
                if not self._flush_kernel(kernel):
                    rest = dict(bounds)  # refused: the dump does them all
                after = self._count()
                if before is not None and after is not None:
                    deleted = max(0, before - after)
            if rest:
                deleted += self._flush_dump(rest)
        except OSError as exc:
            raise ConntrackError(f"ctnetlink: {exc}") from exc
        self.last_path = "+".join(
            p for p, used in (("kernel", bool(kernel) and self.kernel_filter),
                              ("dump", bool(rest))) if used)
        return deleted

    def _use_kernel(self, n: int) -> bool:
        if not n or not self.kernel_filter:
            return False
        if self.path == "kernel":
            return True
        # n walks against one dump (which walks too, and then some).
        own = self._count() or 0
        dump = self.dump_base_s + own * _DUMP_S_PER_OWN_ENTRY + _DUMP_PER_WALK * self.walk_s
        return n * self.walk_s <= dump

    def _flush_kernel(self, bounds: Bounds) -> bool:
        """One filtered delete per target and phase; False if the kernel refused the
        filter (the flusher then dumps from now on). Raises :class:`ConntrackError` on
        another error."""
        requests = [(t, p) for t, phases in sorted(bounds.items())
                    for p in (sorted(phases) if phases is not None else [None])]
        for target, phase in requests:
            seq = self._next_seq()
            c0 = time.thread_time()
            self._sock.send(filtered_delete_request(target, phase, seq))
            for _kind, payload in self._messages(seq):
                (code,) = struct.unpack_from("=i", payload)
                if code in (-errno.EOPNOTSUPP, -errno.EINVAL):
                    self.kernel_filter = False
                    return False
                if code not in (0, -_ENOENT):
                    raise ConntrackError(f"conntrack delete failed: {os.strerror(-code)}")
            self.walk_s = time.thread_time() - c0
        return True

    def _flush_dump(self, bounds: Bounds) -> int:
        deleted = 0
        for tuple_orig, zone, family in self._matches(bounds):
            seq = self._next_seq()
            self._sock.send(delete_request(tuple_orig, zone, seq, family))
            for _kind, payload in self._messages(seq):
                (code,) = struct.unpack_from("=i", payload)
                # ENOENT: it died between dump and delete.
                if code == 0:
                    deleted += 1
                elif code != -_ENOENT:
                    raise ConntrackError(f"conntrack delete failed: {os.strerror(-code)}")
        return deleted

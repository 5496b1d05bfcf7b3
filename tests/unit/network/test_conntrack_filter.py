"""Unit tests of the conntrack cleanup's requests and of its choice between the kernel
filter and the dump (``network/conntrack.py``).

The kernel's answers are played by a fake socket: the refusals of kernels before 6.12
(EOPNOTSUPP, EINVAL) cannot be produced on this machine's kernel.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from ipaddress import IPv4Address, IPv6Address

import pytest

from edgevisor.network.conntrack import (
    PHASE_SHIFT,
    ConntrackError,
    ConntrackFlusher,
    FlushTarget,
    filtered_delete_request,
)

CT_DELETE = (1 << 8) | 2
CT_GET = (1 << 8) | 1


def attrs(data: bytes) -> dict[int, bytes]:
    out, off = {}, 0
    while off + 4 <= len(data):
        n, kind = struct.unpack_from("=HH", data, off)
        out[kind & 0x3FFF] = data[off + 4 : off + n]
        off += (n + 3) & ~3
    return out


def test_filtered_delete_names_zone_side_address_and_the_side_phase() -> None:
    req = filtered_delete_request(FlushTarget(258, "dst", IPv4Address("10.0.0.7")), 2, 9)
    length, mtype, flags, seq, _pid = struct.unpack_from("=IHHII", req)
    assert (length, mtype, flags, seq) == (len(req), CT_DELETE, 0x1 | 0x4, 9)
    assert req[16] == socket.AF_INET
    a = attrs(req[20:])
    assert a[18] == struct.pack("!H", 258)  # CTA_ZONE
    assert a[8] == struct.pack("!I", 2 << PHASE_SHIFT["dst"])  # the phase, where dst has it
    assert a[21] == struct.pack("!I", 3 << PHASE_SHIFT["dst"])  # CTA_MARK_MASK
    assert attrs(attrs(a[1])[1]) == {2: IPv4Address("10.0.0.7").packed}  # orig dst
    assert attrs(a[25]) == {1: struct.pack("=I", 1 << 1)}  # filter: orig dst only

    src0 = attrs(filtered_delete_request(FlushTarget(3, "src", IPv4Address("10.0.0.5")), 0, 1)[20:])
    assert src0[8] == struct.pack("!I", 0)
    assert src0[21] == struct.pack("!I", 3 << PHASE_SHIFT["src"])
    assert attrs(attrs(src0[1])[1]) == {1: IPv4Address("10.0.0.5").packed}
    every = attrs(
        filtered_delete_request(FlushTarget(3, "src", IPv4Address("10.0.0.5")), None, 1)[20:]
    )
    assert 8 not in every and 21 not in every  # no phase: every entry of the target


class FakeKernel:
    """Answers ctnetlink requests: filtered deletes with ``delete_errno``, dumps with no
    entry; records (type, family) of each request."""

    def __init__(self, delete_errno: int = 0) -> None:
        self.delete_errno = delete_errno
        self.sent: list[tuple[int, int]] = []
        self._replies: list[bytes] = []

    def send(self, data: bytes) -> int:
        _len, mtype, _flags, seq, _pid = struct.unpack_from("=IHHII", data)
        self.sent.append((mtype, data[16]))
        if mtype == CT_DELETE:
            body = struct.pack("=i", -self.delete_errno) + data[:16]
            self._replies.append(struct.pack("=IHHII", 16 + len(body), 2, 0, seq, 0) + body)
        else:
            self._replies.append(struct.pack("=IHHII", 20, 3, 0x2, seq, 0) + b"\0" * 4)
        return len(data)

    def recv(self, _n: int) -> bytes:
        return self._replies.pop(0)

    def close(self) -> None:
        pass


def flusher(kernel: FakeKernel, path: str = "auto") -> ConntrackFlusher:
    f = ConntrackFlusher(None, path=path)  # type: ignore[arg-type]
    f._sock.close()
    f._sock = kernel  # type: ignore[assignment]
    if f._count_fd is not None:  # the host's entry count is not the fake's
        os.close(f._count_fd)
        f._count_fd = None
    return f


V4: dict[FlushTarget, frozenset[int] | None] = {
    FlushTarget(1, side, IPv4Address("10.0.0.7")): frozenset({0}) for side in ("src", "dst")
}


def test_ipv4_targets_use_the_kernel_filter_one_request_each() -> None:
    k = FakeKernel()
    f = flusher(k)
    assert f.flush_bounded(V4) == 0
    assert k.sent == [(CT_DELETE, socket.AF_INET)] * 2
    assert f.last_path == "kernel" and f.kernel_filter


@pytest.mark.parametrize("refusal", [errno.EOPNOTSUPP, errno.EINVAL])
def test_a_kernel_refusing_the_filter_switches_to_dumps_for_good(refusal: int) -> None:
    """5.8-6.11 answer EOPNOTSUPP to CTA_FILTER in a delete, older kernels EINVAL."""
    k = FakeKernel(refusal)
    f = flusher(k)
    f.flush_bounded(V4)
    assert k.sent == [(CT_DELETE, socket.AF_INET), (CT_GET, socket.AF_INET)]
    assert not f.kernel_filter and f.last_path == "dump"
    k.sent.clear()
    f.flush_bounded(V4)
    assert k.sent == [(CT_GET, socket.AF_INET)]


def test_one_request_per_target_and_stale_phase() -> None:
    k = FakeKernel()
    f = flusher(k)
    f.flush_bounded(
        {
            FlushTarget(1, "src", IPv4Address("10.0.0.7")): frozenset({0, 2}),
            FlushTarget(1, "dst", IPv4Address("10.0.0.7")): None,
        }
    )
    assert k.sent == [(CT_DELETE, socket.AF_INET)] * 3


def test_another_kernel_error_is_raised() -> None:
    with pytest.raises(ConntrackError, match="conntrack delete failed"):
        flusher(FakeKernel(errno.EPERM)).flush_bounded(V4)


def test_ipv6_targets_go_through_the_dump() -> None:
    """6.12-6.18 compare IPv6 filter addresses inverted: a filtered IPv6 delete would
    remove every *other* entry of the zone."""
    k = FakeKernel()
    f = flusher(k)
    v6 = {FlushTarget(1, "dst", IPv6Address("fd00::7")): frozenset({1})}
    f.flush_bounded({**V4, **v6})
    assert k.sent == [(CT_DELETE, socket.AF_INET)] * 2 + [(CT_GET, socket.AF_UNSPEC)]
    assert f.last_path == "kernel+dump"


def test_many_walks_on_a_big_table_cost_more_than_one_dump() -> None:
    k = FakeKernel()
    f = flusher(k)
    f.walk_s, f.dump_base_s = 5e-3, 9e-3  # ~20,000 entries of other namespaces
    many: dict[FlushTarget, frozenset[int] | None] = {
        FlushTarget(1, side, IPv4Address(f"10.0.0.{i}")): frozenset({0})
        for i in range(1, 4)
        for side in ("src", "dst")
    }
    f.flush_bounded(many)
    assert k.sent == [(CT_GET, socket.AF_INET)] and f.last_path == "dump"
    k.sent.clear()
    f.flush_bounded(V4)  # 2 walks: still cheaper than the dump
    assert k.sent == [(CT_DELETE, socket.AF_INET)] * 2
    forced = flusher(FakeKernel(), path="kernel")
    forced.walk_s, forced.dump_base_s = 5e-3, 9e-3
    forced.flush_bounded(many)
    assert forced.last_path == "kernel"

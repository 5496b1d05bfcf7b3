"""Zero-copy reads in the client core: ``send(..., into=view)`` lands payloads in ``view``."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgevisor.proto.nbd import ClientConnection, ServerConnection
from edgevisor.proto.nbd_wire import (
    SIMPLE_REPLY,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_HDR,
    STRUCTURED_REPLY_MAGIC,
    Closed,
    Cmd,
    Command,
    Errno,
    ErrorReply,
    ExportInfo,
    LocalProtocolError,
    Negotiated,
    ReadReply,
    Reply,
    ReplyType,
    Request,
)

SIZE = 256 * 1024
DISK = os.urandom(SIZE)


class _Catalog:
    def lookup(self, name: str) -> ExportInfo | None:
        return ExportInfo("disk", SIZE) if name == "disk" else None

    def names(self) -> list[tuple[str, str]]:
        return [("disk", "")]


def _pair(structured: bool = True) -> tuple[ServerConnection, ClientConnection]:
    srv, cli = ServerConnection(_Catalog()), ClientConnection("disk", structured=structured)
    for _ in range(50):
        while srv.next_event() is not None:
            pass
        if out := srv.data_to_send():  # (empty bytes would mean EOF)
            cli.receive_data(out)
        while (ev := cli.next_event()) is not None:
            if isinstance(ev, Negotiated):
                return srv, cli
        if out := cli.data_to_send():
            srv.receive_data(out)
    raise AssertionError("handshake did not finish")


def _requests(srv: ServerConnection, wire: bytes) -> list[Request]:
    srv.receive_data(wire)
    out = []
    while (ev := srv.next_event()) is not None:
        assert isinstance(ev, Request)
        out.append(ev)
    return out


def _feed_buffered(cli: ClientConnection, wire: bytes, pieces: list[int]) -> list[object]:
    """Deliver ``wire`` the way a BufferedProtocol does: recv_into get_buffer()."""
    events: list[object] = []
    pos, i = 0, 0
    while pos < len(wire):
        want = pieces[i % len(pieces)] if pieces else len(wire)
        i += 1
        buf = cli.get_buffer(1024)
        n = min(len(buf), want, len(wire) - pos)
        buf[:n] = wire[pos : pos + n]
        cli.buffer_updated(n)
        pos += n
        while (ev := cli.next_event()) is not None:
            events.append(ev)
    return events


def test_single_chunk_read_lands_in_the_destination() -> None:
    srv, cli = _pair()
    dest = bytearray(1000)
    _requests(srv, cli.send(Command(5, Cmd.READ, 4096, 1000), into=memoryview(dest)))
    wire = srv.send(ReadReply(5, DISK[4096:5096]))
    events = _feed_buffered(cli, wire, [7, 300, 4096])
    assert events == [Reply(5, 0, b"")]
    assert dest == DISK[4096:5096]
    assert cli.in_flight == 0


def test_read_split_in_chunks_with_a_hole_and_a_plain_read_interleaved() -> None:
    srv, cli = _pair()
    dest = bytearray(b"\xee" * 300)
    wire = cli.send(Command(1, Cmd.READ, 0, 300), into=memoryview(dest))
    wire += cli.send(Command(2, Cmd.READ, 1000, 10))
    reqs = _requests(srv, wire)
    assert [r.handle for r in reqs] == [1, 2]
    # the hole in the middle must read back as zeroes, whatever the buffer held before
    out = srv.send(ReadReply(2, DISK[1000:1010]))
    out += srv.send(ReadReply(1, DISK[0:100] + DISK[200:300], holes=((100, 100),)))
    events = _feed_buffered(cli, out, [1, 2, 3, 50])
    assert events == [Reply(2, 0, DISK[1000:1010]), Reply(1, 0, b"")]
    assert dest == DISK[0:100] + bytes(100) + DISK[200:300]


def test_error_reply_leaves_no_sink_behind() -> None:
    srv, cli = _pair()
    dest = bytearray(64)
    _requests(srv, cli.send(Command(3, Cmd.READ, 0, 64), into=memoryview(dest)))
    _requests(srv, cli.send(Command(4, Cmd.READ, 64, 64)))
    out = srv.send(ErrorReply(3, Errno.EIO, "disk on fire")) + srv.send(ReadReply(4, DISK[64:128]))
    cli.receive_data(out)
    first, second = cli.next_event(), cli.next_event()
    assert isinstance(first, Reply) and first.error == Errno.EIO and first.data == b""
    assert second == Reply(4, 0, DISK[64:128])
    assert len(cli.get_buffer(16)) >= 16  # back to the core's own buffer


def test_simple_replies_without_structured_negotiation() -> None:
    srv, cli = _pair(structured=False)
    dest = bytearray(5000)
    _requests(srv, cli.send(Command(9, Cmd.READ, 10, 5000), into=memoryview(dest)))
    wire = srv.send(ReadReply(9, DISK[10:5010]))
    assert SIMPLE_REPLY.unpack_from(wire)[0] == SIMPLE_REPLY_MAGIC
    cli.receive_data(wire[:5])  # header split: through receive_data, not get_buffer
    assert cli.next_event() is None
    events = _feed_buffered(cli, wire[5:], [999])
    assert events == [Reply(9, 0, b"")] and dest == DISK[10:5010]


def test_eof_in_the_middle_of_a_payload_closes() -> None:
    srv, cli = _pair()
    dest = bytearray(4096)
    _requests(srv, cli.send(Command(1, Cmd.READ, 0, 4096), into=memoryview(dest)))
    wire = srv.send(ReadReply(1, DISK[:4096]))
    assert _feed_buffered(cli, wire[:1000], []) == []
    cli.receive_data(b"")
    ev = cli.next_event()
    assert isinstance(ev, Closed)


def test_data_chunk_outside_the_range_is_a_protocol_error() -> None:
    srv, cli = _pair()
    dest = bytearray(16)
    _requests(srv, cli.send(Command(1, Cmd.READ, 0, 16), into=memoryview(dest)))
    payload = struct.pack(">Q", 8) + bytes(16)  # 8..24 sticks out of 0..16
    chunk = STRUCTURED_HDR.pack(STRUCTURED_REPLY_MAGIC, 1, ReplyType.OFFSET_DATA, 1, len(payload))
    cli.receive_data(chunk + payload)
    with pytest.raises(Exception, match="outside the requested range"):
        cli.next_event()


def test_destination_must_fit_the_read() -> None:
    _srv, cli = _pair()
    with pytest.raises(LocalProtocolError):
        cli.send(Command(1, Cmd.READ, 0, 16), into=memoryview(bytearray(15)))
    with pytest.raises(LocalProtocolError):
        cli.send(Command(2, Cmd.WRITE, 0, 4, data=b"abcd"), into=memoryview(bytearray(4)))
    with pytest.raises(LocalProtocolError):
        cli.send(Command(3, Cmd.READ, 0, 4), into=memoryview(b"abcd"))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    reads=st.lists(
        st.tuples(st.integers(0, SIZE - 1), st.integers(1, 9000), st.booleans()),
        min_size=1,
        max_size=8,
    ),
    pieces=st.lists(st.integers(1, 20_000), min_size=1, max_size=6),
    structured=st.booleans(),
    data=st.data(),
)
def test_pipelined_reads_into_buffers_match_the_disk(
    reads: list[tuple[int, int, bool]],
    pieces: list[int],
    structured: bool,
    data: st.DataObject,
) -> None:
    srv, cli = _pair(structured)
    dests: dict[int, bytearray | None] = {}
    wire = b""
    for h, (off, n, into) in enumerate(reads, start=1):
        n = min(n, SIZE - off)
        dest = bytearray(b"\x55" * n) if into else None
        dests[h] = dest
        wire += cli.send(
            Command(h, Cmd.READ, off, n), into=memoryview(dest) if dest is not None else None
        )
    reqs = _requests(srv, wire)
    order = data.draw(st.permutations(reqs))
    out = b""
    holed: set[int] = set()
    for r in order:
        body = DISK[r.offset : r.offset + r.length]
        holes: tuple[tuple[int, int], ...] = ()
        if structured and r.length >= 3 and data.draw(st.booleans()):
            # a hole in the middle: the server says those bytes are zero
            lo = r.length // 3
            hi = 2 * r.length // 3
            body = body[:lo] + body[hi:]
            holes = ((r.offset + lo, hi - lo),)
            holed.add(r.handle)
        out += srv.send(ReadReply(r.handle, body, holes=holes))
    events = _feed_buffered(cli, out, pieces)
    assert sorted(e.handle for e in events if isinstance(e, Reply)) == sorted(dests)
    by_handle = {e.handle: e for e in events if isinstance(e, Reply)}
    for r in reqs:
        expect = bytearray(DISK[r.offset : r.offset + r.length])
        lo, hi = r.length // 3, 2 * r.length // 3
        dest = dests[r.handle]
        got = bytes(dest) if dest is not None else by_handle[r.handle].data
        if r.handle in holed:
            expect[lo:hi] = bytes(hi - lo)
        assert got == bytes(expect)
        if dest is not None:
            assert by_handle[r.handle].data == b""
    assert cli.in_flight == 0


def test_receive_window_stops_at_the_next_reply_head_while_reads_with_destinations_fly() -> None:
    srv, cli = _pair()
    assert len(cli.get_buffer(1024)) >= 1024  # nothing in flight: the whole buffer
    dest = bytearray(8192)
    _requests(srv, cli.send(Command(1, Cmd.READ, 0, 8192), into=memoryview(dest)))
    head = STRUCTURED_HDR.size + 8
    assert len(cli.get_buffer(1024)) == head  # the payload must not land in the core
    wire = srv.send(ReadReply(1, DISK[:8192]))
    buf = cli.get_buffer(1024)
    buf[:5] = wire[:5]
    cli.buffer_updated(5)
    assert cli.next_event() is None
    assert len(cli.get_buffer(1024)) == head - 5
    assert _feed_buffered(cli, wire[5:], []) == [Reply(1, 0, b"")]
    assert dest == DISK[:8192]
    assert len(cli.get_buffer(1024)) >= 1024  # back to normal once no such read flies


def test_simple_error_reply_to_a_read_with_a_destination() -> None:
    srv, cli = _pair(structured=False)
    dest = bytearray(100)
    _requests(srv, cli.send(Command(2, Cmd.READ, 0, 100), into=memoryview(dest)))
    assert len(cli.get_buffer(1024)) == SIMPLE_REPLY.size
    cli.receive_data(SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, Errno.EIO, 2))
    assert cli.next_event() == Reply(2, Errno.EIO, b"")
    assert cli.in_flight == 0 and len(cli.get_buffer(1024)) >= 1024

"""The sans-IO NBD core: server and client paired over a fake link, plus fuzzing."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgevisor.proto.nbd import ClientConnection, ServerConnection, TLSPolicy
from edgevisor.proto.nbd_wire import (
    CMD_FLAG_FUA,
    CMD_FLAG_REQ_ONE,
    CTX_BASE_ALLOCATION,
    CTX_EDGEVISOR_SYNC,
    IHAVEOPT,
    NBDMAGIC,
    OPT_REPLY_MAGIC,
    OPTION_HDR,
    OPTION_REPLY_HDR,
    REQUEST,
    REQUEST_MAGIC,
    SIMPLE_REPLY,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_HDR,
    BlockStatusReply,
    Closed,
    Cmd,
    Command,
    Done,
    Errno,
    ErrorReply,
    ExportInfo,
    ExportList,
    HandshakeFailed,
    LocalProtocolError,
    Negotiated,
    Opt,
    ReadReply,
    RemoteProtocolError,
    Rep,
    Reply,
    ReplyType,
    Request,
    StartTLS,
)

SIZE = 64 * 1024 + 300


class Catalog:
    def __init__(self, *exports: ExportInfo) -> None:
        self.exports = {e.name: e for e in exports}

    def lookup(self, name: str) -> ExportInfo | None:
        return self.exports.get(name)

    def names(self) -> list[tuple[str, str]]:
        return [(n, e.description) for n, e in self.exports.items()]


def default_catalog() -> Catalog:
    return Catalog(
        ExportInfo("disk", SIZE, contexts=(CTX_BASE_ALLOCATION, CTX_EDGEVISOR_SYNC)),
        ExportInfo("ro", 4096, read_only=True),
    )


@dataclass
class Link:
    """A server core, a client core and an in-memory disk answering requests."""

    server: ServerConnection
    client: ClientConnection
    disk: bytearray = field(default_factory=lambda: bytearray(SIZE))
    chunk: int = 1 << 30
    server_events: list[object] = field(default_factory=list)
    client_events: list[object] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)

    def _deliver(self, data: bytes, to: ServerConnection | ClientConnection) -> None:
        for i in range(0, len(data), self.chunk):
            to.receive_data(data[i : i + self.chunk])

    def answer(self, req: Request) -> bytes:
        self.requests.append(req)
        end = req.offset + req.length
        assert end <= len(self.disk), "core let a request past the end through"
        if req.cmd is Cmd.READ:
            return self.server.send(ReadReply(req.handle, bytes(self.disk[req.offset : end])))
        if req.cmd is Cmd.WRITE:
            self.disk[req.offset : end] = req.data
        elif req.cmd in (Cmd.WRITE_ZEROES, Cmd.TRIM):
            self.disk[req.offset : end] = bytes(req.length)
        elif req.cmd is Cmd.BLOCK_STATUS:
            half = max(1, req.length // 2)
            ext = {cid: ((half, 0), (req.length, 1)) for cid in self.server.contexts}
            return self.server.send(BlockStatusReply(req.handle, ext))
        return self.server.send(Done(req.handle))

    def pump(self) -> None:
        for _ in range(10_000):
            moved = False
            out = self.server.data_to_send()
            if out:
                moved = True
                self._deliver(out, self.client)
            out = self.client.data_to_send()
            if out:
                moved = True
                self._deliver(out, self.server)
            while (ev := self.server.next_event()) is not None:
                moved = True
                self.server_events.append(ev)
                if isinstance(ev, Request):
                    self._deliver(self.answer(ev), self.client)
            while (cev := self.client.next_event()) is not None:
                moved = True
                self.client_events.append(cev)
            if not moved and not self.server._out and not self.client._out:
                return
        raise AssertionError("link did not settle")


def connect(
    export: str = "disk", chunk: int = 1 << 30, contexts: tuple[str, ...] = (CTX_BASE_ALLOCATION,)
) -> Link:
    link = Link(ServerConnection(default_catalog()), ClientConnection(export, contexts=contexts))
    link.chunk = chunk
    link.pump()
    return link


def test_handshake_negotiates_structured_and_contexts() -> None:
    link = connect(contexts=(CTX_EDGEVISOR_SYNC, CTX_BASE_ALLOCATION, "other:ctx"))
    ev = link.client_events[-1]
    assert isinstance(ev, Negotiated)
    assert ev.structured
    assert sorted(ev.contexts.values()) == [CTX_BASE_ALLOCATION, CTX_EDGEVISOR_SYNC]
    assert ev.export.size == SIZE
    sev = link.server_events[-1]
    assert isinstance(sev, Negotiated) and sev.contexts == ev.contexts


def test_unknown_export_fails_handshake() -> None:
    link = connect("nope")
    ev = link.client_events[-1]
    assert isinstance(ev, HandshakeFailed) and ev.reply == Rep.ERR_UNKNOWN


def test_list_exports() -> None:
    link = Link(ServerConnection(default_catalog()), ClientConnection(list_exports=True))
    link.pump()
    ev = link.client_events[0]
    assert isinstance(ev, ExportList)
    assert [n for n, _ in ev.exports] == ["disk", "ro"]
    assert isinstance(link.server_events[-1], Closed)  # the client's ABORT


def test_starttls_handshake_signals_both_sides() -> None:
    link = Link(
        ServerConnection(default_catalog(), tls=TLSPolicy.REQUIRED),
        ClientConnection("disk", tls=True),
    )
    link.pump()
    assert isinstance(link.server_events[-1], StartTLS)
    assert isinstance(link.client_events[-1], StartTLS)
    link.server.tls_started()
    link.client.tls_started()
    link.pump()
    assert isinstance(link.client_events[-1], Negotiated)


def test_tls_required_refuses_plain_options() -> None:
    link = Link(
        ServerConnection(default_catalog(), tls=TLSPolicy.REQUIRED), ClientConnection("disk")
    )
    link.pump()
    ev = link.client_events[-1]
    assert isinstance(ev, HandshakeFailed) and ev.reply == Rep.ERR_TLS_REQD


def test_starttls_refused_when_tls_off() -> None:
    link = Link(ServerConnection(default_catalog()), ClientConnection("disk", tls=True))
    link.pump()
    ev = link.client_events[-1]
    assert isinstance(ev, HandshakeFailed) and ev.reply == Rep.ERR_POLICY


def test_pipelined_commands_replied_out_of_order() -> None:
    link = connect()
    c = link.client
    out = c.send(Command(1, Cmd.WRITE, 10, 3, data=b"abc"))
    out += c.send(Command(2, Cmd.READ, 0, 16))
    out += c.send(Command(3, Cmd.FLUSH))
    link.server.receive_data(out)
    reqs = []
    while (ev := link.server.next_event()) is not None:
        assert isinstance(ev, Request)
        reqs.append(ev)
    assert [r.handle for r in reqs] == [1, 2, 3]
    link.disk[10:13] = b"abc"
    # answer in reverse order
    for r in reversed(reqs):
        if r.cmd is Cmd.READ:
            c.receive_data(link.server.send(ReadReply(r.handle, bytes(link.disk[0:16]))))
        else:
            c.receive_data(link.server.send(Done(r.handle)))
    replies = []
    while (cev := c.next_event()) is not None:
        replies.append(cev)
    assert [r.handle for r in replies if isinstance(r, Reply)] == [3, 2, 1]
    assert replies[1] == Reply(2, 0, bytes(10) + b"abc" + bytes(3))


def test_read_reply_with_holes_is_reassembled() -> None:
    link = connect()
    link.server.receive_data(link.client.send(Command(7, Cmd.READ, 100, 50)))
    req = link.server.next_event()
    assert isinstance(req, Request)
    wire = link.server.send(ReadReply(7, b"A" * 10 + b"B" * 20, holes=((110, 20),)))
    link.client.receive_data(wire)
    rep = link.client.next_event()
    assert rep == Reply(7, 0, b"A" * 10 + bytes(20) + b"B" * 20)


@pytest.mark.parametrize(
    ("cmd", "offset", "length", "flags", "err"),
    [
        (Cmd.READ, SIZE - 10, 11, 0, Errno.EINVAL),
        (Cmd.WRITE, SIZE - 10, 11, 0, Errno.ENOSPC),
        (Cmd.WRITE_ZEROES, SIZE, 1, 0, Errno.ENOSPC),
        (Cmd.TRIM, SIZE + 5, 1, 0, Errno.EINVAL),
        (Cmd.READ, 0, 0, 0, Errno.EINVAL),
        (Cmd.WRITE, 0, 0, 0, Errno.EINVAL),
        (Cmd.READ, 0, 10, 1 << 9, Errno.EINVAL),
        (Cmd.CACHE, 0, 10, 0, Errno.EINVAL),
        (Cmd.BLOCK_STATUS, 2**63, 2**31, 0, Errno.EINVAL),
    ],
)
def test_invalid_requests_get_error_replies_and_never_reach_the_app(
    cmd: Cmd, offset: int, length: int, flags: int, err: Errno
) -> None:
    link = connect()
    payload = b"x" * length if cmd is Cmd.WRITE else b""
    wire = REQUEST.pack(REQUEST_MAGIC, flags, cmd, 99, offset, length) + payload
    # a valid request right behind proves the payload was skipped, not misparsed
    wire += link.client.send(Command(100, Cmd.READ, 0, 4))
    link.client._inflight[99] = link.client._inflight[100].__class__(Cmd.READ, 0, 0)
    link.server.receive_data(wire)
    link.pump()
    assert [r.handle for r in link.requests] == [100]
    replies = {e.handle: e for e in link.client_events if isinstance(e, Reply)}
    assert replies[99].error == err
    assert replies[100] == Reply(100, 0, bytes(4))


def test_oversized_write_payload_is_skipped() -> None:
    link = Link(ServerConnection(default_catalog(), max_payload=4096), ClientConnection("disk"))
    link.pump()
    wire = REQUEST.pack(REQUEST_MAGIC, 0, Cmd.WRITE, 5, 0, 5000) + b"y" * 5000
    wire += REQUEST.pack(REQUEST_MAGIC, 0, Cmd.FLUSH, 6, 0, 0)
    link.server.receive_data(wire[:3000])
    assert link.server.next_event() is None
    link.server.receive_data(wire[3000:])
    ev = link.server.next_event()
    assert isinstance(ev, Request) and ev.handle == 6
    err = link.server.data_to_send()
    _magic, _flags, typ, handle, _n = STRUCTURED_HDR.unpack_from(err)
    assert (typ, handle) == (ReplyType.ERROR, 5)
    assert struct.unpack_from(">I", err, STRUCTURED_HDR.size)[0] == Errno.EINVAL
    assert link.disk == bytearray(SIZE)


def test_read_only_export_refuses_writes() -> None:
    link = connect("ro")
    c = link.client
    link.server.receive_data(c.send(Command(1, Cmd.WRITE, 0, 2, data=b"hi")))
    link.pump()
    rep = link.client_events[-1]
    assert isinstance(rep, Reply) and rep.error == Errno.EPERM
    assert link.requests == []


def test_bad_request_magic_closes_without_exception() -> None:
    link = connect()
    link.server.receive_data(b"\xde\xad\xbe\xef" + bytes(24))
    ev = link.server.next_event()
    assert isinstance(ev, Closed) and link.server.closed


def test_disc_closes_and_eof_midway_closes() -> None:
    link = connect()
    link.server.receive_data(link.client.send(Command(1, Cmd.DISC)))
    assert isinstance(link.server.next_event(), Closed)
    link2 = connect()
    link2.server.receive_data(REQUEST.pack(REQUEST_MAGIC, 0, Cmd.WRITE, 1, 0, 100)[:20])
    assert link2.server.next_event() is None
    link2.server.receive_data(b"")
    assert isinstance(link2.server.next_event(), Closed)


def test_block_status_req_one_is_clipped() -> None:
    link = connect()
    link.server.receive_data(
        link.client.send(Command(3, Cmd.BLOCK_STATUS, 0, 1000, flags=CMD_FLAG_REQ_ONE))
    )
    req = link.server.next_event()
    assert isinstance(req, Request)
    (cid,) = link.server.contexts
    link.client.receive_data(link.server.send(BlockStatusReply(3, {cid: ((5000, 0), (10, 3))})))
    rep = link.client.next_event()
    assert isinstance(rep, Reply) and rep.extents == {cid: ((1000, 0),)}


def test_app_bugs_raise_local_protocol_error() -> None:
    link = connect()
    with pytest.raises(LocalProtocolError):
        link.server.send(Done(12345))
    with pytest.raises(LocalProtocolError):
        link.client.send(Command(1, Cmd.WRITE, 0, 5, data=b"abc"))


def test_client_rejects_garbage_from_server() -> None:
    link = connect()
    link.client.send(Command(1, Cmd.READ, 0, 10))
    link.client.receive_data(b"\x00" * 32)
    with pytest.raises(RemoteProtocolError):
        link.client.next_event()


def test_client_export_name_fallback_when_go_unsupported() -> None:
    c = ClientConnection("d", structured=False)
    c.receive_data(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 3))
    assert c.next_event() is None
    sent = c.data_to_send()
    assert sent[:4] == struct.pack(">I", 3)
    c.receive_data(OPTION_REPLY_HDR.pack(OPT_REPLY_MAGIC, Opt.GO, Rep.ERR_UNSUP, 0))
    assert c.next_event() is None
    assert OPTION_HDR.unpack_from(c.data_to_send())[1] == Opt.EXPORT_NAME
    c.receive_data(struct.pack(">QH", 1234, 1))
    ev = c.next_event()
    assert isinstance(ev, Negotiated) and ev.export.size == 1234 and not ev.structured
    c.send(Command(1, Cmd.READ, 0, 4))
    c.receive_data(SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, 1) + b"wxyz")
    assert c.next_event() == Reply(1, 0, b"wxyz")


# ------------------------------------------------------------------ properties

commands = st.one_of(
    st.tuples(st.just(Cmd.READ), st.integers(0, SIZE), st.integers(1, 5000), st.booleans()),
    st.tuples(st.just(Cmd.WRITE), st.integers(0, SIZE), st.integers(1, 5000), st.booleans()),
    st.tuples(st.just(Cmd.WRITE_ZEROES), st.integers(0, SIZE), st.integers(1, 5000), st.booleans()),
    st.tuples(st.just(Cmd.TRIM), st.integers(0, SIZE), st.integers(1, 5000), st.booleans()),
    st.tuples(st.just(Cmd.FLUSH), st.just(0), st.just(0), st.booleans()),
    st.tuples(st.just(Cmd.BLOCK_STATUS), st.integers(0, SIZE), st.integers(1, 5000), st.booleans()),
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=st.lists(commands, min_size=1, max_size=25),
    chunk=st.integers(1, 300),
    structured=st.booleans(),
    data=st.data(),
)
def test_paired_cores_match_a_model_disk(
    ops: list[tuple[Cmd, int, int, bool]], chunk: int, structured: bool, data: st.DataObject
) -> None:
    ctx = (CTX_BASE_ALLOCATION,) if structured else ()
    link = Link(
        ServerConnection(default_catalog()),
        ClientConnection("disk", structured=structured, contexts=ctx),
    )
    link.chunk = chunk
    link.pump()
    assert isinstance(link.client_events[-1], Negotiated)
    model = bytearray(SIZE)
    expect: dict[int, tuple[int, bytes | None]] = {}
    for handle, (cmd, off, length, fua) in enumerate(ops, start=1):
        if cmd is Cmd.BLOCK_STATUS and not structured:
            continue
        flags = CMD_FLAG_FUA if fua else 0
        payload = b""
        if cmd is Cmd.WRITE:
            payload = data.draw(st.binary(min_size=length, max_size=length))
        out_of_range = off + length > SIZE
        err = 0
        if out_of_range:
            err = Errno.ENOSPC if cmd in (Cmd.WRITE, Cmd.WRITE_ZEROES) else Errno.EINVAL
        elif cmd is Cmd.WRITE:
            model[off : off + length] = payload
        elif cmd in (Cmd.WRITE_ZEROES, Cmd.TRIM):
            model[off : off + length] = bytes(length)
        want = bytes(model[off : off + length]) if cmd is Cmd.READ and not err else None
        expect[handle] = (err, want)
        link.server.receive_data(
            link.client.send(Command(handle, cmd, off, length, flags, payload))
        )
        link.pump()
    replies = {e.handle: e for e in link.client_events if isinstance(e, Reply)}
    assert set(replies) == set(expect)
    for h, (err, want) in expect.items():
        assert replies[h].error == err, (h, replies[h])
        if want is not None:
            assert replies[h].data == want
    assert link.disk == model
    assert link.client.in_flight == 0


@settings(max_examples=150, deadline=None)
@given(
    noise=st.lists(
        st.one_of(
            st.binary(max_size=64),
            st.builds(
                lambda o, d: OPTION_HDR.pack(IHAVEOPT, o, len(d)) + d,
                st.integers(0, 12),
                st.binary(max_size=40),
            ),
            st.builds(
                lambda c, f, off, n: REQUEST.pack(REQUEST_MAGIC, f, c, 1, off, n),
                st.integers(0, 10),
                st.integers(0, 0xFFFF),
                st.integers(0, 2**64 - 1),
                st.integers(0, 2**32 - 1),
            ),
        ),
        max_size=12,
    ),
    after_handshake=st.booleans(),
)
def test_server_survives_arbitrary_input(noise: list[bytes], after_handshake: bool) -> None:
    server = ServerConnection(default_catalog(), max_payload=1 << 16)
    if after_handshake:
        link = Link(server, ClientConnection("disk", contexts=(CTX_BASE_ALLOCATION,)))
        link.pump()
    else:
        server.receive_data(struct.pack(">I", 1))
    for blob in noise:
        server.receive_data(blob)
        while (ev := server.next_event()) is not None:
            if isinstance(ev, Request):
                assert server.export is not None
                assert ev.offset + ev.length <= server.export.size
                if ev.cmd is Cmd.WRITE:
                    assert len(ev.data) == ev.length
                server.send(ErrorReply(ev.handle, Errno.EIO))
        server.data_to_send()
    server.receive_data(b"")
    while server.next_event() is not None:
        pass
    assert server.closed


@settings(max_examples=100, deadline=None)
@given(noise=st.lists(st.binary(max_size=80), max_size=10))
def test_client_raises_only_remote_protocol_errors(noise: list[bytes]) -> None:
    link = connect()
    link.client.send(Command(1, Cmd.READ, 0, 16))
    link.client.send(Command(2, Cmd.BLOCK_STATUS, 0, 16))
    try:
        for blob in noise:
            link.client.receive_data(blob)
            while link.client.next_event() is not None:
                pass
    except RemoteProtocolError:
        pass

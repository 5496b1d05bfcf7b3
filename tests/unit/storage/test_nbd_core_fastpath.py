"""The server core's read hot path (issue 5): in-place read reply frames and the READ
validation shortcut, checked against the general encoder and the spec's rules."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgevisor.proto.nbd import ClientConnection, ServerConnection
from edgevisor.proto.nbd_wire import (
    CMD_FLAG_DF,
    CMD_FLAG_FUA,
    REQUEST,
    REQUEST_MAGIC,
    Cmd,
    Command,
    Done,
    Errno,
    ExportInfo,
    LocalProtocolError,
    Negotiated,
    ReadReply,
    Reply,
    Request,
)

SIZE = 1 << 20
MAX_PAYLOAD = 64 * 1024


class _Catalog:
    def lookup(self, name: str) -> ExportInfo | None:
        return ExportInfo("disk", SIZE) if name == "disk" else None

    def names(self) -> list[tuple[str, str]]:
        return [("disk", "")]


def _negotiate(structured: bool) -> tuple[ServerConnection, ClientConnection]:
    server = ServerConnection(_Catalog(), max_payload=MAX_PAYLOAD)
    client = ClientConnection("disk", structured=structured)
    for _ in range(50):
        moved = False
        if out := server.data_to_send():
            client.receive_data(out)
            moved = True
        if out := client.data_to_send():
            server.receive_data(out)
            moved = True
        while server.next_event() is not None:
            moved = True
        while (cev := client.next_event()) is not None:
            moved = True
            if isinstance(cev, Negotiated):
                assert cev.structured is structured
                return server, client
        if not moved:
            break
    raise AssertionError("handshake did not finish")


def _request(server: ServerConnection, wire: bytes) -> Request:
    server.receive_data(wire)
    ev = server.next_event()
    assert isinstance(ev, Request)
    return ev


@pytest.mark.parametrize("structured", [True, False])
def test_read_reply_frame_encodes_like_send(structured: bool) -> None:
    server, client = _negotiate(structured)
    payload = bytes(range(256)) * 16
    req = _request(server, client.send(Command(7, Cmd.READ, 8192, len(payload))))
    frame, start = server.read_reply_frame(req.handle)
    assert len(frame) - start == len(payload)
    frame[start:] = payload
    # The same request answered through the general encoder gives the same bytes.
    req2 = _request(server, client.send(Command(8, Cmd.READ, 8192, len(payload))))
    reference = server.send(ReadReply(req2.handle, payload))
    assert bytes(frame[:start]) == reference[:start].replace(
        (8).to_bytes(8, "big"), (7).to_bytes(8, "big"), 1
    )
    assert bytes(frame[start:]) == reference[start:]
    client.receive_data(bytes(frame) + reference)
    assert client.next_event() == Reply(7, 0, payload)
    assert client.next_event() == Reply(8, 0, payload)


def test_read_reply_frame_refuses_unknown_and_non_read_handles() -> None:
    server, client = _negotiate(True)
    with pytest.raises(LocalProtocolError):
        server.read_reply_frame(404)
    req = _request(server, client.send(Command(3, Cmd.WRITE, 0, 4, data=b"abcd")))
    with pytest.raises(LocalProtocolError):
        server.read_reply_frame(req.handle)
    with pytest.raises(LocalProtocolError):
        server.read_reply_header(req.handle)
    # The refused write is still in flight and can be answered properly.
    client.receive_data(server.send(Done(req.handle)))
    assert client.next_event() == Reply(3, 0)


def _expected_read_error(structured: bool, flags: int, offset: int, length: int) -> bool:
    """The spec's rules for a READ, written out independently of the core."""
    allowed = CMD_FLAG_FUA | (CMD_FLAG_DF if structured else 0)
    return bool(flags & ~allowed) or length == 0 or length > MAX_PAYLOAD or offset + length > SIZE


@settings(max_examples=300, deadline=None)
@given(
    structured=st.booleans(),
    flags=st.sampled_from([0, CMD_FLAG_FUA, CMD_FLAG_DF, CMD_FLAG_FUA | CMD_FLAG_DF, 1 << 9, 0xFF]),
    offset=st.one_of(st.integers(0, SIZE + 10), st.sampled_from([0, SIZE - 1, 2**63])),
    length=st.one_of(st.integers(0, MAX_PAYLOAD + 10), st.sampled_from([0, 1, 2**32 - 1])),
)
def test_read_validation_follows_the_spec(
    structured: bool, flags: int, offset: int, length: int
) -> None:
    server, _client = _negotiate(structured)
    wire = REQUEST.pack(REQUEST_MAGIC, flags, Cmd.READ, 5, offset, length)
    wire += REQUEST.pack(REQUEST_MAGIC, 0, Cmd.READ, 6, 0, 1)  # framing stays in step
    server.receive_data(wire)
    events = []
    while (ev := server.next_event()) is not None:
        events.append(ev)
    handles = [e.handle for e in events if isinstance(e, Request)]
    errors = server.data_to_send()
    if _expected_read_error(structured, flags, offset, length):
        assert handles == [6]
        assert errors  # an error reply for handle 5
        assert (5).to_bytes(8, "big") in errors
        code = Errno.EINVAL.to_bytes(4, "big")
        assert code in errors
    else:
        assert handles == [5, 6]
        assert errors == b""

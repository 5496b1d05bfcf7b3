"""The coordinator <-> runtime framing core: pairs of connections over a fake link, fuzzed."""

from __future__ import annotations

import contextlib
import json
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgevisor.proto.runtime import (
    NEED_DATA,
    Closed,
    Event,
    Invoke,
    Load,
    LocalProtocolError,
    Log,
    Ready,
    RemoteProtocolError,
    Result,
    RuntimeConnection,
    State,
    Subcall,
    SubcallResult,
)


def pump(src_bytes: bytes, dst: RuntimeConnection) -> list[Event]:
    dst.receive_data(src_bytes)
    out: list[Event] = []
    while True:
        ev = dst.next_event()
        if ev is NEED_DATA:
            return out
        out.append(ev)
        if isinstance(ev, Closed):
            return out


def pair() -> tuple[RuntimeConnection, RuntimeConnection]:
    return RuntimeConnection("coordinator"), RuntimeConnection("runtime")


def frame(body: Any) -> bytes:
    raw = json.dumps(body).encode()
    return struct.pack(">I", len(raw)) + raw


def test_full_call_with_log_and_subcall_round_trips() -> None:
    coord, rt = pair()
    assert pump(rt.send(Ready(0.25)), coord) == [Ready(0.25)]
    inv = Invoke("c1", {"x": [1, 2]}, {"timeout_s": 3})
    assert pump(coord.send(inv), rt) == [inv]
    log = Log("c1", "output", b"\x00\xffhello\n")
    assert pump(rt.send(log), coord) == [log]
    sub = Subcall("c1", 1, "other", {"a": 1}, True)
    assert pump(rt.send(sub), coord) == [sub]
    assert coord.state is State.SUBCALL and rt.state is State.SUBCALL
    sres = SubcallResult("c1", 1, True, "call-9")
    assert pump(coord.send(sres), rt) == [sres]
    res = Result("c1", False, None, {"type": "ValueError", "message": "x", "traceback": "tb"})
    assert pump(rt.send(res), coord) == [res]
    assert (coord.state, rt.state) == (State.IDLE, State.IDLE)


def test_byte_at_a_time_delivery_yields_the_same_events() -> None:
    coord, rt = pair()
    data = rt.send(Ready(1.0))
    got: list[Event] = []
    for i in range(len(data)):
        coord.receive_data(data[i : i + 1])
        ev = coord.next_event()
        if ev is not NEED_DATA:
            got.append(ev)
    assert got == [Ready(1.0)]


def test_ready_with_error_closes_the_link() -> None:
    coord, rt = pair()
    err = {"type": "ImportError", "message": "no module"}
    assert pump(rt.send(Ready(0.1, err)), coord) == [Ready(0.1, err), Closed()]
    assert coord.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        coord.send(Invoke("c1", None))


def test_load_turns_a_stem_into_a_task_runtime() -> None:
    coord, rt = pair()
    assert pump(rt.send(Ready(0.01)), coord) == [Ready(0.01)]
    load = Load("python", "app:main", "/task", {"A": "b"})
    assert pump(coord.send(load), rt) == [load]
    assert coord.state is State.LOADING
    with pytest.raises(LocalProtocolError):
        coord.send(Invoke("c1", None))  # not before the handler is loaded
    assert pump(rt.send(Ready(0.2)), coord) == [Ready(0.2)]
    assert pump(coord.send(Invoke("c1", None)), rt) == [Invoke("c1", None)]
    with pytest.raises(LocalProtocolError):
        coord.send(Load("python", "x:y", "/task"))  # not while busy


def test_load_before_ready_and_bad_env_are_rejected() -> None:
    coord, rt = pair()
    with pytest.raises(LocalProtocolError):
        coord.send(Load("python", "a:b", "/task"))
    pump(rt.send(Ready(0)), coord)
    bad = frame({"k": "load", "runtime": "python", "handler": "a:b", "bundle": "/t",
                 "env": {"A": 1}})
    with pytest.raises(RemoteProtocolError, match="env"):
        pump(bad, rt_after_ready())


def rt_after_ready() -> RuntimeConnection:
    rt = RuntimeConnection("runtime")
    RuntimeConnection("coordinator").receive_data(rt.send(Ready(0)))
    return rt


def test_role_checks_on_send() -> None:
    coord, rt = pair()
    with pytest.raises(LocalProtocolError):
        coord.send(Ready(0.0))
    with pytest.raises(LocalProtocolError):
        rt.send(Invoke("c", 1))


def test_peer_sending_our_kind_is_remote_error() -> None:
    coord = RuntimeConnection("coordinator")
    with pytest.raises(RemoteProtocolError, match="ours to send"):
        pump(frame({"k": "invoke", "id": "c", "event": 1, "context": {}}), coord)


def test_invoke_before_ready_is_rejected() -> None:
    coord, rt = pair()
    with pytest.raises(LocalProtocolError):
        coord.send(Invoke("c1", 1))
    with pytest.raises(RemoteProtocolError):
        pump(frame({"k": "invoke", "id": "c", "event": 1, "context": {}}), rt)


def test_result_for_wrong_call_id_is_rejected() -> None:
    coord, rt = pair()
    pump(rt.send(Ready(0)), coord)
    pump(coord.send(Invoke("c1", 1)), rt)
    with pytest.raises(RemoteProtocolError, match="Result not allowed"):
        pump(frame({"k": "result", "id": "other", "ok": True, "value": 1}), coord)


def test_non_json_value_leaves_state_untouched() -> None:
    coord, rt = pair()
    pump(rt.send(Ready(0)), coord)
    pump(coord.send(Invoke("c1", 1)), rt)
    with pytest.raises(LocalProtocolError, match="not JSON"):
        rt.send(Result("c1", True, {1, 2}))
    assert rt.state is State.BUSY
    ok = Result("c1", False, None, {"type": "ResultError", "message": "m"})
    assert pump(rt.send(ok), coord) == [ok]


def test_nan_is_not_json() -> None:
    coord, rt = pair()
    pump(rt.send(Ready(0)), coord)
    with pytest.raises(LocalProtocolError):
        coord.send(Invoke("c1", float("nan")))


def test_size_limits_both_ways() -> None:
    coord = RuntimeConnection("coordinator", max_frame_bytes=100)
    rt = RuntimeConnection("runtime", max_frame_bytes=100)
    pump(rt.send(Ready(0)), coord)
    with pytest.raises(LocalProtocolError, match="exceeds"):
        coord.send(Invoke("c1", "x" * 200))
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        coord.receive_data(struct.pack(">I", 101))
        coord.next_event()


@pytest.mark.parametrize(
    "data",
    [
        struct.pack(">I", 3) + b"\xff\xfe\xfd",  # not UTF-8
        struct.pack(">I", 2) + b"[]",  # not an object
        frame({"k": "nope"}),
        frame({"k": "ready"}),  # missing init_s
        frame({"k": "ready", "init_s": True}),  # bool is not a number here
        frame({"k": "ready", "init_s": 0, "error": "x"}),
        frame({"k": "log", "id": "c", "stream": "s", "data": "!!!"}),
    ],
)
def test_malformed_frames_are_typed_errors(data: bytes) -> None:
    coord = RuntimeConnection("coordinator")
    with pytest.raises(RemoteProtocolError):
        pump(data, coord)


def test_eof_inside_a_frame_is_an_error_and_at_boundary_is_closed() -> None:
    coord, rt = pair()
    data = rt.send(Ready(0))
    coord.receive_data(data[:-1])
    assert coord.next_event() is NEED_DATA
    coord.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="end of file"):
        coord.next_event()
    coord2 = RuntimeConnection("coordinator")
    assert pump(data + b"", coord2) == [Ready(0)]
    coord2.receive_data(b"")
    assert isinstance(coord2.next_event(), Closed)
    assert coord2.state is State.CLOSED
    with pytest.raises(RemoteProtocolError):
        coord2.receive_data(b"more")


def test_unknown_role_rejected() -> None:
    with pytest.raises(ValueError):
        RuntimeConnection("server")  # type: ignore[arg-type]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None)
@given(
    calls=st.lists(
        st.tuples(
            json_values,
            st.lists(st.binary(max_size=40), max_size=3),
            st.lists(json_values, max_size=2),
            st.booleans(),
            json_values,
        ),
        max_size=4,
    ),
    cuts=st.lists(st.integers(1, 64), min_size=1, max_size=8),
)
def test_random_conversations_survive_any_chunking(
    calls: list[tuple[Any, list[bytes], list[Any], bool, Any]], cuts: list[int]
) -> None:
    """Every sequence of legal calls arrives intact, whatever the read sizes."""
    coord, rt = pair()
    assert chunked(rt.send(Ready(0.5)), cuts, coord) == [Ready(0.5)]
    to_coord: list[Event] = []
    wire = bytearray()
    got_rt: list[Event] = []
    for n, (event, logs, subs, ok, value) in enumerate(calls):
        cid = f"c{n}"
        inv = Invoke(cid, event, {"n": n})
        got_rt += pump(coord.send(inv), rt)
        for data in logs:
            wire += rt.send(Log(cid, "output", data))
            to_coord.append(Log(cid, "output", data))
        for i, sub_event in enumerate(subs):
            sub = Subcall(cid, i + 1, "t", sub_event, ok)
            wire += rt.send(sub)
            to_coord.append(sub)
            got_rt += pump(coord_side_reply(coord, wire, to_coord, cid, i + 1), rt)
        res = Result(cid, ok, value if ok else None, None if ok else {"type": "E"})
        wire += rt.send(res)
        to_coord.append(res)
        # Feed the coordinator the runtime's bytes in random-sized pieces.
        got = chunked(bytes(wire), cuts, coord)
        wire.clear()
        assert got == to_coord
        to_coord = []
    assert [e for e in got_rt if isinstance(e, Invoke)] == [
        Invoke(f"c{n}", c[0], {"n": n}) for n, c in enumerate(calls)
    ]


def coord_side_reply(
    coord: RuntimeConnection, wire: bytearray, expected: list[Event], cid: str, sub_id: int
) -> bytes:
    got = chunked(bytes(wire), [7], coord)
    assert got == expected
    expected.clear()
    wire.clear()
    return coord.send(SubcallResult(cid, sub_id, True, sub_id))


def chunked(data: bytes, cuts: list[int], conn: RuntimeConnection) -> list[Event]:
    out: list[Event] = []
    pos = 0
    i = 0
    while pos < len(data):
        step = cuts[i % len(cuts)]
        i += 1
        out += pump(data[pos : pos + step], conn)
        pos += step
    return out


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_never_raises_anything_but_protocol_errors(data: bytes) -> None:
    for role in ("coordinator", "runtime"):
        conn = RuntimeConnection(role, max_frame_bytes=64)
        with contextlib.suppress(RemoteProtocolError):
            pump(data, conn)
            conn.receive_data(b"")
            conn.next_event()


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["k", "id", "ok", "init_s", "sub_id", "data", "stream",
                                        "task", "async", "context", "error", "value"]),
                       json_values, max_size=8))
def test_random_json_objects_are_events_or_protocol_errors(body: dict[str, Any]) -> None:
    for kind in ("ready", "invoke", "result", "log", "subcall", "subcall_result"):
        conn = RuntimeConnection("coordinator")
        with contextlib.suppress(RemoteProtocolError):
            pump(frame({**body, "k": kind}), conn)

"""Push channel frames (agent.channel_frames) and prepared-update staging
(agent.records_staging): pure parts, no I/O."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgevisor.agent.channel_frames import (
    FrameError,
    NotPrepared,
    decode_reply,
    decode_request,
    encode_error,
    encode_reply,
    encode_request,
)
from edgevisor.agent.records_staging import Staging
from edgevisor.errors import Conflict, EdgevisorError, NotFound, PeerUnavailable, Unauthorized

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


@given(
    rid=st.integers(0, 2**62),
    op=st.text(min_size=1, max_size=30),
    payload=st.dictionaries(st.text(max_size=8), json_values, max_size=5),
)
def test_request_round_trip(rid: int, op: str, payload: dict[str, Any]) -> None:
    req = decode_request(encode_request(rid, op, payload))
    assert (req.id, req.op, req.payload) == (rid, op, payload)


@given(rid=st.integers(0, 2**62), result=json_values)
def test_reply_round_trip(rid: int, result: Any) -> None:
    reply = decode_reply(encode_reply(rid, result))
    assert (reply.id, reply.result, reply.error) == (rid, result, None)


@pytest.mark.parametrize(
    "exc",
    [
        Conflict("generation 3 is behind 4"),
        NotPrepared("no prepared update 'x'"),
        Unauthorized("need the key"),
        NotFound("agent has no operation 'x'"),
        PeerUnavailable("down"),
        EdgevisorError("internal error: boom"),
    ],
)
def test_errors_come_back_as_the_same_typed_error(exc: EdgevisorError) -> None:
    reply = decode_reply(encode_error(9, exc))
    assert reply.id == 9
    assert type(reply.error) is type(exc)
    assert reply.error is not None
    assert reply.error.message == exc.message
    assert reply.error.status == exc.status


def test_error_details_survive() -> None:
    reply = decode_reply(encode_error(1, Conflict("x", details={"generation": 4})))
    assert isinstance(reply.error, Conflict)
    assert reply.error.details == {"generation": 4}


@pytest.mark.parametrize(
    ("frame", "rid"),
    [
        ("not json", None),
        ("[1, 2]", None),
        ('{"op": "x"}', None),
        ('{"id": "7", "op": "x"}', None),
        ('{"id": true, "op": "x"}', None),
        ('{"id": 7}', 7),
        ('{"id": 7, "op": ""}', 7),
        ('{"id": 7, "op": 3}', 7),
    ],
)
def test_malformed_requests(frame: str, rid: int | None) -> None:
    with pytest.raises(FrameError) as got:
        decode_request(frame)
    assert got.value.id == rid


def test_request_payload_defaults_to_an_empty_object() -> None:
    assert decode_request(b'{"id": 1, "op": "records.state"}').payload == {}


@pytest.mark.parametrize("frame", ["nope", '{"result": 1}', '{"id": 3}', "[]"])
def test_malformed_replies(frame: str) -> None:
    with pytest.raises(FrameError):
        decode_reply(frame)


def test_reply_error_without_a_usable_status_is_rebuilt_by_code() -> None:
    frame = json.dumps(
        {"id": 2, "status": "x", "error": {"code": "not_prepared", "message": "gone"}}
    )
    assert isinstance(decode_reply(frame).error, NotPrepared)


# --- staging ----------------------------------------------------------------------------


def test_staged_item_is_taken_once() -> None:
    s: Staging[str] = Staging(ttl_s=10)
    s.put("a", "A", now=0.0)
    assert s.take("a", now=1.0) == "A"
    assert s.take("a", now=1.0) is None
    assert s.take("never", now=1.0) is None


def test_staged_item_expires() -> None:
    s: Staging[str] = Staging(ttl_s=10)
    s.put("a", "A", now=0.0)
    s.put("b", "B", now=5.0)
    assert s.take("a", now=10.0) is None  # expired exactly at put + ttl
    assert len(s) == 1
    assert s.take("b", now=14.9) == "B"


def test_expired_entries_go_at_the_next_put() -> None:
    s: Staging[int] = Staging(ttl_s=1)
    for i in range(5):
        s.put(str(i), i, now=0.0)
    s.put("x", 9, now=2.0)
    assert len(s) == 1


def test_restaged_token_is_replaced_and_its_ttl_restarts() -> None:
    s: Staging[str] = Staging(ttl_s=10)
    s.put("a", "old", now=0.0)
    s.put("b", "B", now=1.0)
    s.put("a", "new", now=8.0)
    assert s.take("b", now=11.5) is None
    assert s.take("a", now=17.0) == "new"


def test_staging_is_bounded_oldest_first() -> None:
    s: Staging[int] = Staging(ttl_s=100, max_entries=3)
    for i in range(5):
        s.put(str(i), i, now=float(i))
    assert len(s) == 3
    assert [s.take(str(i), now=5.0) for i in range(5)] == [None, None, 2, 3, 4]


def test_staging_refuses_nonsense_limits() -> None:
    with pytest.raises(ValueError):
        Staging(ttl_s=0)
    with pytest.raises(ValueError):
        Staging(max_entries=0)


@given(st.lists(st.tuples(st.sampled_from("abcd"), st.booleans(), st.floats(0, 3)), max_size=40))
def test_staging_matches_a_model(ops: list[tuple[str, bool, float]]) -> None:
    s: Staging[int] = Staging(ttl_s=2.0, max_entries=3)
    model: dict[str, tuple[float, int]] = {}  # token -> (staged at, item)
    now = 0.0
    for n, (token, put, step) in enumerate(ops):
        now += step
        model = {k: v for k, v in model.items() if v[0] + 2.0 > now}
        if put:
            model.pop(token, None)
            model[token] = (now, n)
            while len(model) > 3:
                del model[min(model, key=lambda k: model[k][0])]
            s.put(token, n, now)
        else:
            want = model.pop(token, None)
            assert s.take(token, now) == (None if want is None else want[1])

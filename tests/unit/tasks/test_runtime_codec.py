"""The runtime's own JSON + framing (it cannot import json's ``re`` cheaply) matches the core."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgevisor.proto.runtime import NEED_DATA, Invoke, Log, Ready, Result, RuntimeConnection
from edgevisor.tasks.runtime import evruntime

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=20)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=15,
)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_codec_agrees_with_json(value: Any) -> None:
    text = evruntime._dumps(value)
    assert text == json.dumps(value, separators=(",", ":"), allow_nan=False)
    assert evruntime._loads(text) == json.loads(text)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), {1, 2}, object(), b"bytes"])
def test_codec_refuses_what_is_not_json(value: Any) -> None:
    with pytest.raises((TypeError, ValueError)):
        evruntime._dumps(value)


def test_codec_refuses_cycles() -> None:
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(ValueError):
        evruntime._dumps(loop)


@pytest.mark.parametrize("text", ["", "{", "[1,]", '{"a":1} x', "NaN", "Infinity", "'a'"])
def test_loads_rejects_malformed(text: str) -> None:
    with pytest.raises(ValueError):
        evruntime._loads(text)


def test_runtime_frames_are_what_the_coordinator_core_expects() -> None:
    r, w = os.pipe()
    try:
        link = evruntime._Link(-1, w, 1 << 20)
        link.send({"k": "ready", "init_s": 0.5, "error": None})
        coord = RuntimeConnection("coordinator")
        coord.receive_data(os.read(r, 1 << 16))
        assert coord.next_event() == Ready(0.5)
        assert coord.next_event() is NEED_DATA
    finally:
        os.close(r)
        os.close(w)


def test_log_and_result_frames_decode_in_the_core() -> None:
    coord = RuntimeConnection("coordinator")
    rt = RuntimeConnection("runtime")
    coord.receive_data(rt.send(Ready(0.0)))
    assert coord.next_event() == Ready(0.0)
    rt.receive_data(coord.send(Invoke("c1", None)))
    rt.next_event()
    link = evruntime._Link(-1, -1, 1 << 20)
    data = b"\x00\xffout\n"
    coord.receive_data(link.encode(
        {"k": "log", "id": "c1", "stream": "output", "data": evruntime._b64(data)}
    ))
    coord.receive_data(link.encode(
        {"k": "result", "id": "c1", "ok": True, "value": {"a": [1]}, "error": None}
    ))
    assert coord.next_event() == Log("c1", "output", data)
    assert coord.next_event() == Result("c1", True, {"a": [1]}, None)
    assert coord.next_event() is NEED_DATA


def test_oversized_result_is_refused_before_it_is_sent() -> None:
    link = evruntime._Link(-1, -1, 100)
    with pytest.raises(evruntime.FrameTooLarge):
        link.encode({"k": "result", "value": "x" * 200})

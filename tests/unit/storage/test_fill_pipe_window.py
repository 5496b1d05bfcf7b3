"""The in-flight window of a pipelined NBD reader (proto/nbd_pipeline): handles, matching
of out-of-order replies to their jobs, errors of one piece, draining on a broken link."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgevisor.proto.nbd_pipeline import Completed, PipeWindow
from edgevisor.proto.nbd_wire import LocalProtocolError, RemoteProtocolError


def test_out_of_order_replies_complete_their_own_jobs() -> None:
    w = PipeWindow(depth=3)
    t1, (h1,) = w.add([0])
    t2, (h2,) = w.add([4096])
    t3, (h3,) = w.add([8192])
    assert len({h1, h2, h3}) == 3 and len({t1, t2, t3}) == 3
    assert not w.has_room and len(w) == 3 and w.commands == 3
    assert w.reply(h3) == Completed(t3)
    assert w.has_room and len(w) == 2
    assert w.reply(h1) == Completed(t1)
    assert w.reply(h2) == Completed(t2)
    assert len(w) == 0 and w.commands == 0


def test_a_split_job_completes_with_its_last_piece_and_keeps_the_first_error() -> None:
    w = PipeWindow(depth=2)
    t, hs = w.add([0, 100, 200])
    other, (ho,) = w.add([300])
    assert len(w) == 2 and w.commands == 4
    assert w.reply(hs[1], 22, "bad") is None  # an error does not end the job early
    assert w.reply(ho) == Completed(other)  # another job's reply in between
    assert w.reply(hs[2], 5, "later") is None
    assert w.reply(hs[0]) == Completed(t, 22, "bad", 100)
    assert len(w) == 0


def test_unknown_or_repeated_handles_are_the_peers_fault() -> None:
    w = PipeWindow(depth=1)
    _, (h,) = w.add([0])
    with pytest.raises(RemoteProtocolError):
        w.reply(h + 1)
    w.reply(h)
    with pytest.raises(RemoteProtocolError):
        w.reply(h)  # answered twice


def test_drain_gives_the_jobs_in_flight_oldest_first_and_handles_stay_fresh() -> None:
    w = PipeWindow(depth=4)
    t1, h1 = w.add([0, 10])
    t2, _ = w.add([20])
    _, h3 = w.add([30])
    w.reply(h1[0])
    w.reply(h3[0])  # t3 done
    assert w.drain() == [t1, t2]
    assert len(w) == 0 and w.commands == 0 and w.has_room
    with pytest.raises(RemoteProtocolError):  # a late reply of a drained job
        w.reply(h1[1])
    _, h4 = w.add([0])
    assert h4[0] not in (*h1, *h3)  # never reused on the same connection


def test_bad_use() -> None:
    with pytest.raises(ValueError):
        PipeWindow(depth=0)
    with pytest.raises(LocalProtocolError):
        PipeWindow(depth=1).add([])


@given(
    pieces=st.lists(st.integers(1, 4), min_size=1, max_size=8),
    order=st.randoms(use_true_random=False),
    errors=st.sets(st.integers(0, 31)),
)
def test_any_reply_order_completes_each_job_once_after_all_its_pieces(
    pieces: list[int], order: object, errors: set[int]
) -> None:
    w = PipeWindow(depth=len(pieces))
    owner: dict[int, int] = {}
    remaining: dict[int, int] = {}
    for n in pieces:
        t, hs = w.add(list(range(n)))
        remaining[t] = n
        owner.update(dict.fromkeys(hs, t))
    handles = list(owner)
    order.shuffle(handles)  # type: ignore[attr-defined]
    done: list[int] = []
    for i, h in enumerate(handles):
        err = 5 if i in errors else 0
        c = w.reply(h, err)
        t = owner[h]
        remaining[t] -= 1
        if remaining[t]:
            assert c is None
        else:
            assert c is not None and c.ticket == t
            done.append(t)
    assert sorted(done) == sorted(remaining) and len(w) == 0

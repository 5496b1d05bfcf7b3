"""SourceLayout keeps every window it learnt: the fill asks the source once per window,
however often read misses move its cursor between windows."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from edgevisor.storage.lazy_parts import SourceLayout

BS = 4096


def test_windows_learnt_earlier_stay_known() -> None:
    lay = SourceLayout(BS, 100 * BS)
    lay.learn(0, 10, [(2 * BS, 3 * BS, True)])
    lay.learn(50, 60, [(50 * BS, 10 * BS, True)])
    assert lay.covers(0) and lay.covers(9) and lay.covers(55)
    assert not lay.covers(10) and not lay.covers(49) and not lay.covers(60)
    assert lay.segments(1, 5) == [(1, 1, False), (2, 3, True), (5, 1, False)]
    assert lay.segments(58, 4) == [(58, 2, True), (60, 2, False)]


def test_a_run_across_an_unknown_gap_is_data_in_the_gap() -> None:
    lay = SourceLayout(BS, 100 * BS)
    lay.learn(0, 10, [(0, 10 * BS, True)])
    lay.learn(20, 30, [(20 * BS, 10 * BS, True)])
    assert lay.segments(5, 20) == [(5, 5, True), (10, 10, False), (20, 5, True)]


def test_learning_a_window_again_replaces_what_was_known_there() -> None:
    lay = SourceLayout(BS, 100 * BS)
    lay.learn(0, 20, [(0, 20 * BS, True)])
    lay.learn(5, 10, [])  # now data there
    assert lay.segments(0, 20) == [(0, 5, True), (5, 5, False), (10, 10, True)]


@given(
    st.lists(
        st.tuples(
            st.integers(0, 90),
            st.integers(1, 30),
            st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4)), max_size=3),
        ),
        max_size=6,
    ),
    st.integers(0, 99),
    st.integers(1, 40),
)
def test_segments_match_the_last_learnt_window_per_block(
    windows: list[tuple[int, int, list[tuple[int, int]]]], first: int, count: int
) -> None:
    """Reference model: per block, the zero flag of the last window learnt over it
    (whole blocks only here), data where no window was learnt."""
    nblocks = 100
    lay = SourceLayout(BS, nblocks * BS)
    model: dict[int, bool] = {}
    for lo, n, zeros in windows:
        hi = min(lo + n, nblocks)
        extents = [((lo + a) * BS, b * BS, True) for a, b in zeros]
        lay.learn(lo, hi, extents)
        for blk in range(lo, hi):
            model[blk] = any(lo + a <= blk < lo + a + b for a, b in zeros)
    count = min(count, nblocks - first)
    segs = lay.segments(first, count)
    got: dict[int, bool] = {}
    pos = first
    for b, n, zero in segs:
        assert b == pos and n > 0
        for blk in range(b, b + n):
            got[blk] = zero
        pos += n
    assert pos == first + count
    assert got == {blk: model.get(blk, False) for blk in range(first, first + count)}
    for blk in range(nblocks):
        assert lay.covers(blk) == (blk in model)

"""SourceLayout: which blocks the fill may skip because the source holds a hole there."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from edgevisor.storage.lazy_parts import SourceLayout

BS = 4096


def test_only_whole_blocks_inside_a_zero_extent_are_zero() -> None:
    lay = SourceLayout(BS, 10 * BS)
    # zero from the middle of block 1 to the middle of block 5; data after that
    lay.learn(0, 10, [(0, BS + 100, False), (BS + 100, 4 * BS, True), (5 * BS + 100, 0, False)])
    assert lay.segments(0, 10) == [(0, 2, False), (2, 3, True), (5, 5, False)]
    assert lay.segments(3, 1) == [(3, 1, True)]
    assert lay.segments(4, 3) == [(4, 1, True), (5, 2, False)]


def test_the_short_last_block_counts_when_the_extent_reaches_the_end() -> None:
    lay = SourceLayout(BS, 3 * BS + 10)  # 4 blocks, the last one 10 bytes
    lay.learn(0, 4, [(0, BS, False), (BS, 2 * BS + 10, True)])
    assert lay.segments(0, 4) == [(0, 1, False), (1, 3, True)]


def test_outside_the_window_everything_is_data() -> None:
    lay = SourceLayout(BS, 100 * BS)
    assert lay.segments(5, 3) == [(5, 3, False)]  # nothing learnt yet
    lay.learn(10, 20, [(10 * BS, 10 * BS, True)])
    assert not lay.covers(9) and lay.covers(10) and not lay.covers(20)
    assert lay.segments(18, 5) == [(18, 2, True), (20, 3, False)]


@given(
    st.lists(st.tuples(st.integers(0, 40 * BS), st.integers(0, 8 * BS), st.booleans()), max_size=8),
    st.integers(0, 30),
    st.integers(1, 12),
)
def test_segments_cover_the_run_and_never_skip_data(
    extents: list[tuple[int, int, bool]], first: int, count: int
) -> None:
    size = 40 * BS
    lay = SourceLayout(BS, size)
    lay.learn(0, 40, extents)
    count = min(count, 40 - first)
    segs = lay.segments(first, count)
    # contiguous, in order, exactly the run
    pos = first
    for b, n, _zero in segs:
        assert b == pos and n > 0
        pos += n
    assert pos == first + count

    def all_zero(lo: int, hi: int) -> bool:  # every byte inside some zero extent
        return all(
            any(z and off <= x < off + n for off, n, z in extents) for x in range(lo, hi, 512)
        ) and any(z and off <= hi - 1 < off + n for off, n, z in extents)

    for b, n, zero in segs:
        if zero:
            for blk in range(b, b + n):
                assert all_zero(blk * BS, min((blk + 1) * BS, size))

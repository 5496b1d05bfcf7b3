"""Bitmap.find (the fill's next-missing-block search) against a bit-by-bit reference."""

from __future__ import annotations

import random

from edgevisor.storage.bitmap import Bitmap


def _reference(bm: Bitmap, value: bool, start: int, end: int) -> int:
    stop = min(end, bm.nbits)
    return next((i for i in range(start, stop) if bm.get(i) == value), stop)


def test_find_matches_reference_on_random_bitmaps() -> None:
    rng = random.Random(6)
    for _ in range(300):
        n = rng.randint(1, 300)
        bm = Bitmap(n)
        for _ in range(rng.randint(0, 20)):
            first = rng.randrange(n)
            bm.set_range(first, rng.randint(1, n - first), rng.random() < 0.6)
        for _ in range(30):
            start = rng.randrange(n + 1)
            end = rng.randint(start, n + 5)
            for value in (True, False):
                assert bm.find(value, start, end) == _reference(bm, value, start, end)


def test_find_skips_long_runs() -> None:
    bm = Bitmap(1 << 16, fill=True)
    bm.set_range(60001, 1, False)
    assert bm.find(False, 3, 1 << 16) == 60001
    assert bm.find(False, 60002, 1 << 16) == 1 << 16
    assert bm.find(True, 60001, 60002) == 60002

"""MirrorStats: the counters a lazy volume keeps of its foreground writes and flushes."""

from __future__ import annotations

import time

from edgevisor.storage.mirror_stats import MirrorStats


def test_sizes_concurrency_and_events() -> None:
    st = MirrorStats(max_events=3)
    a = st.write_started(1 << 20)
    b = st.write_started(4096)
    c = st.write_started(5000)  # rounds up to the 8 KiB bucket
    st.write_ended(b)
    st.write_ended(a)
    st.write_ended(c)
    t = st.started()
    st.flush_ended(t)
    d = st.as_dict()
    assert d["sizes_kib"] == {4: 1, 8: 1, 1024: 1}
    assert d["write_bytes"] == (1 << 20) + 4096 + 5000
    assert d["max_in_flight"] == 3 and d["concurrent_writes"] == 2
    assert d["write"]["count"] == 3 and d["flush"]["count"] == 1
    # bounded log, oldest dropped, on the monotonic clock
    assert [k for k, _, _ in st.events] == ["write", "write", "flush"]
    assert all(s <= e <= time.monotonic() for _, s, e in st.events)


def test_timer_mean_and_max() -> None:
    st = MirrorStats()
    st.mirror.add(0.002)
    st.mirror.add(0.004)
    m = st.as_dict()["mirror"]
    assert m == {"count": 2, "mean_ms": 3.0, "max_ms": 4.0, "total_ms": 6.0}

"""Where a lazy volume's foreground writes and flushes spend their time (cheap counters).

A :class:`~edgevisor.storage.lazy.LazyVolume` records, per call, how long each part of a
write (fetching partially covered missing blocks, the local ``pwrite``, the mirror to the
source) and of a flush (local ``fdatasync`` and the source's flush, which run at once)
took, the sizes of the writes it was given, and how many were in flight together. The
figures answer "why is a write+fsync during post-sync slow": many small requests, one
slow round trip each, requests serialised upstream (concurrency stays 1), or flushes.

Recording costs a ``perf_counter`` call and a few additions per request; no I/O, no lock
(everything runs on the volume's event loop).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["MirrorStats", "Timer"]


@dataclass
class Timer:
    """Count and total/maximum seconds of one kind of step."""

    count: int = 0
    total_s: float = 0.0
    max_s: float = 0.0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.total_s += seconds
        self.max_s = max(self.max_s, seconds)

    def as_dict(self) -> dict[str, float]:
        mean = self.total_s / self.count if self.count else 0.0
        return {
            "count": self.count,
            "mean_ms": round(mean * 1e3, 3),
            "max_ms": round(self.max_s * 1e3, 3),
            "total_ms": round(self.total_s * 1e3, 3),
        }


@dataclass
class MirrorStats:
    """Counters of one lazy volume's foreground I/O (see the module docstring)."""

    write: Timer = field(default_factory=Timer)  # whole write call, entry to return
    prepare: Timer = field(default_factory=Timer)  # partial missing blocks fetched first
    local: Timer = field(default_factory=Timer)  # local pwrite (+ flush with FUA)
    store_wait: Timer = field(default_factory=Timer)  # waiting out a lane's store of the blocks
    mirror: Timer = field(default_factory=Timer)  # sync mirror: the source's round trip
    mirror_small: Timer = field(default_factory=Timer)  # the same, writes of <= 64 KiB
    flush: Timer = field(default_factory=Timer)  # whole flush call
    flush_local: Timer = field(default_factory=Timer)
    flush_source: Timer = field(default_factory=Timer)
    flush_source_skipped: int = 0  # nothing mirrored since the source's last flush
    write_bytes: int = 0
    sizes: dict[int, int] = field(default_factory=dict)  # KiB, rounded up to 2^n -> count
    events: list[tuple[str, float, float]] = field(default_factory=list)
    """(``write``/``flush``, start, end) in ``time.monotonic()`` (one clock for every
    process on the host, so a caller's own timestamps line up), the last ``max_events``."""
    max_events: int = 4096
    in_flight: int = 0
    max_in_flight: int = 0  # writes under way at once (1: the caller serialises them)
    concurrent_writes: int = 0  # writes that started while another was under way

    def write_started(self, length: int) -> float:
        self.write_bytes += length
        kib = max(1, -(-length // 1024))
        bucket = 1 << (kib - 1).bit_length()
        self.sizes[bucket] = self.sizes.get(bucket, 0) + 1
        if self.in_flight:
            self.concurrent_writes += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        return time.monotonic()

    def write_ended(self, t0: float) -> None:
        self.in_flight -= 1
        self._event("write", self.write, t0)

    def flush_ended(self, t0: float) -> None:
        self._event("flush", self.flush, t0)

    def _event(self, kind: str, timer: Timer, t0: float) -> None:
        end = time.monotonic()
        timer.add(end - t0)
        self.events.append((kind, t0, end))
        if len(self.events) > self.max_events:
            del self.events[: len(self.events) - self.max_events]

    def started(self) -> float:
        return time.monotonic()

    def as_dict(self) -> dict[str, Any]:
        return {
            "write": self.write.as_dict(),
            "prepare": self.prepare.as_dict(),
            "local": self.local.as_dict(),
            "store_wait": self.store_wait.as_dict(),
            "mirror": self.mirror.as_dict(),
            "mirror_small": self.mirror_small.as_dict(),
            "flush": self.flush.as_dict(),
            "flush_local": self.flush_local.as_dict(),
            "flush_source": self.flush_source.as_dict(),
            "flush_source_skipped": self.flush_source_skipped,
            "write_bytes": self.write_bytes,
            "sizes_kib": dict(sorted(self.sizes.items())),
            "max_in_flight": self.max_in_flight,
            "concurrent_writes": self.concurrent_writes,
        }

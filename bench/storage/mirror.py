"""Lazy-volume benchmark: foreground write+flush latency with a sync mirror, same run.

    .venv/bin/python bench/storage/mirror.py [--size-mib 512] [--rounds 2] [--period-ms 25]
        [--link tls|plain]

What ext4 sends its block device for one ``pwrite`` of 1 MiB + ``fsync`` of an overwrite
(seen at the lazy volume in ``bench/migration/fill_writes.py``): the 1 MiB of data, then
the journal (8 KiB), a flush, the commit block (4 KiB) and a flush, one after the other.
This replays that sequence straight on a :class:`~edgevisor.storage.lazy.LazyVolume`
(no FUSE, loop or ext4 in the way), every ``--period-ms``, and reports its latency
p50/p99:

1. **during the fill**: a fresh lazy volume (sync mirror to the source) fills at full
   speed while the sequence runs;
2. **mirrored, filled**: the same volume once every block is present (the mirror's cost
   without the fill competing);
3. **local only**: a plain local :class:`~edgevisor.storage.volume.Volume` (the baseline).

The source is our NBD server in another process (as on two hosts), over TLS with fleet
certificates by default (``--link plain``: NBD over TCP), serving random bytes. Run it
twice, once with ``PYTHONPATH`` pointing at a baseline tree, for a before/after. Where
the volume exposes :attr:`~edgevisor.storage.lazy.LazyVolume.stats`, the median split of
a sequence (the local ``pwrite``\\s, mirror round trips, local and source flushes) is
printed too. Prints a markdown table to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lazy import BS, MiB, _Source, log, make_source

from edgevisor.storage.lazy import LazySettings, LazyVolume
from edgevisor.storage.volume import Volume

_JOURNAL = 8 * MiB  # the sequence's journal area: the last 8 MiB of the volume


async def sequence(dev: Any, rng: random.Random, size: int) -> float:
    """One 1 MiB write + fsync as ext4 sends it; returns its seconds."""
    data_end = size - _JOURNAL
    off = rng.randrange(0, data_end // MiB) * MiB
    j = data_end + rng.randrange(0, _JOURNAL // 4096 - 3) * 4096
    t0 = time.perf_counter()
    await dev.write(off, rng.randbytes(MiB))
    await dev.write(j, rng.randbytes(8192))
    await dev.flush()
    await dev.write(j + 8192, rng.randbytes(4096))
    await dev.flush()
    return time.perf_counter() - t0


async def paced(
    dev: Any, size: int, period_s: float, until: Any, at_least: int, rng: random.Random
) -> list[float]:
    """Sequences every ``period_s`` until ``until()`` (and at least ``at_least`` of them)."""
    lat: list[float] = []
    nxt = time.perf_counter()
    while len(lat) < at_least or not until():
        await asyncio.sleep(max(0.0, nxt - time.perf_counter()))
        nxt += period_s
        lat.append(await sequence(dev, rng, size))
    return lat


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def ms(v: float) -> str:
    return f"{v * 1e3:.1f} ms"


async def run(args: argparse.Namespace, tmp: Path) -> dict[str, list[float]]:
    size = args.size_mib * MiB
    make_source(tmp / "src", size)
    source = _Source(tmp / "src", tmp, args.link, 2)
    await source.start()
    out: dict[str, list[float]] = {"fill": [], "filled": [], "local": []}
    period = args.period_ms / 1e3
    try:
        for r in range(args.rounds):
            rng = random.Random(r)
            dst = Volume.create(tmp / f"dst{r}", size, BS, present=False)
            cfg = LazySettings(mirror="sync", **json.loads(args.settings))
            lazy = LazyVolume(dst, source.connect, cfg)
            await lazy.read(0, 4096)  # connected outside the measurement
            lazy.start()
            t0 = time.perf_counter()
            out["fill"] += await paced(lazy, size, period, lazy.filled.is_set, 3, rng)
            fill_s = time.perf_counter() - t0
            stats = getattr(lazy, "stats", None)
            split = stats.as_dict() if stats is not None else None
            out["filled"] += await paced(lazy, size, period, lambda: True, args.count, rng)
            await lazy.aclose()
            await dst.aclose()
            shutil.rmtree(tmp / f"dst{r}")
            plain = Volume.create(tmp / f"plain{r}", size, BS)
            out["local"] += await paced(plain, size, period, lambda: True, args.count, rng)
            await plain.aclose()
            shutil.rmtree(tmp / f"plain{r}")
            log(f"round {r}: fill {fill_s:.2f} s with {len(out['fill'])} sequences so far")
            if split is not None:
                log("  during the fill, the lazy volume's counters: " + json.dumps(split))
    finally:
        await source.stop()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--period-ms", type=float, default=25.0)
    ap.add_argument("--count", type=int, default=40, help="sequences per filled/local row")
    ap.add_argument("--link", choices=["tls", "plain"], default="tls")
    ap.add_argument("--settings", default="{}", help="LazySettings fields as JSON")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="edgevisor-bench-mirror-"))
    try:
        out = asyncio.run(run(args, tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"One ext4-style 1 MiB write + fsync (1 MiB data, 8 KiB journal, flush, 4 KiB "
        f"commit, flush) on a {args.size_mib} MiB lazy volume, sync mirror over "
        f"{args.link} to a source in another process, every {args.period_ms:g} ms "
        f"({args.rounds} rounds).\n"
    )
    print("| when | sequences | p50 | p99 |")
    print("|---|---|---|---|")
    names = {
        "fill": "during the fill (mirrored)",
        "filled": "filled, still mirrored",
        "local": "local volume only",
    }
    for k, lat in out.items():
        print(f"| {names[k]} | {len(lat)} | {ms(pct(lat, 0.5))} | {ms(pct(lat, 0.99))} |")


if __name__ == "__main__":
    main()

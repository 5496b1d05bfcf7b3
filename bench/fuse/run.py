"""Benchmark: cold sequential read of a fully present image through FUSE vs the file itself.

    .venv/bin/python bench/fuse/run.py [--size-mib 512] [--runs 3] [--block-kib 1024]

Cold means: nothing of the image is in any page cache when the read starts. The backing
file is evicted with ``posix_fadvise(DONTNEED)`` after an fsync (a per-file drop that does
not disturb other work on the machine; ``--drop-caches`` writes ``/proc/sys/vm/drop_caches``
instead), and every FUSE run reads through a fresh mount, so its page cache is empty too.
Rows: the backing file read directly (baseline); the FUSE image with ``direct_io`` (the
default), with the page cache and a 1 MiB or the kernel's 128 KiB readahead, and with a
warm backing file (FUSE overhead alone); last, a file inside ext4 on loop on the image
with the default settings. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from edgevisor.storage.attach import AttachedVolume, AttachSettings, start_fuse, stop_fuse
from edgevisor.storage.fuse_image import IMAGE_NAME


def _fill(path: Path, size: int) -> None:
    chunk = os.urandom(1 << 20)  # incompressible; repeated is fine for a read benchmark
    with open(path, "wb") as fh:
        for _ in range(size >> 20):
            fh.write(chunk)
        fh.flush()
        os.fsync(fh.fileno())


def _evict(path: Path, drop_caches: bool) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    if drop_caches:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


def _read_all(path: Path, block: int, *, direct: bool = False) -> tuple[int, float]:
    flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
    fd = os.open(path, flags)
    buf = bytearray(block)
    view = memoryview(buf)
    total = 0
    t0 = time.perf_counter()
    try:
        while True:
            n = os.readv(fd, [view])
            if n <= 0:
                break
            total += n
    finally:
        os.close(fd)
    return total, time.perf_counter() - t0


async def _fuse_run(
    work: Path, backing: Path, block: int, settings: AttachSettings, warm: bool, drop: bool
) -> float:
    mnt = work / f"mnt{time.monotonic_ns()}"
    if warm:
        _read_all(backing, block)
    else:
        _evict(backing, drop)
    pid = await start_fuse(
        mnt, kind="file", arg=str(backing), log_path=work / "fuse.log", settings=settings
    )
    try:
        total, secs = await asyncio.to_thread(_read_all, mnt / IMAGE_NAME, block)
    finally:
        await stop_fuse(mnt, pid, settings=settings)
        mnt.rmdir()
    return total / secs


async def _ext4_prepare(work: Path, image: Path, size: int, file_size: int) -> Path:
    """Make ``image`` an ext4 volume holding one file of ``file_size`` random bytes."""
    fd = os.open(image, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
    vol = _ext4_volume(work, image)
    await vol.attach()
    try:
        data = work / "ext4" / "data.bin"
        chunk = os.urandom(1 << 20)
        with open(data, "wb") as fh:
            for _ in range(file_size >> 20):
                fh.write(chunk)
            os.fsync(fh.fileno())
    finally:
        await vol.detach()
    return data


def _ext4_volume(work: Path, image: Path) -> AttachedVolume:
    return AttachedVolume(
        "bench", state_dir=work / "state", target=work / "ext4", kind="file", arg=str(image)
    )


async def _ext4_run(work: Path, image: Path, data: Path, block: int, drop: bool) -> float:
    """Read the file inside ext4 on loop on the FUSE image, freshly attached (all cold)."""
    _evict(image, drop)
    vol = _ext4_volume(work, image)
    await vol.attach()
    try:
        total, secs = await asyncio.to_thread(_read_all, data, block)
    finally:
        await vol.detach()
    return total / secs


async def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--size-mib", type=int, default=512)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--block-kib", type=int, default=1024, help="read(2) size of the reader")
    p.add_argument("--dir", default=None, help="work directory (default: a temp dir in /var/tmp)")
    p.add_argument("--no-ext4", action="store_true", help="skip the ext4-on-loop row")
    p.add_argument("--drop-caches", action="store_true", help="also drop all caches (global)")
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix=f"evbench-fuse-{os.getpid()}-", dir=args.dir or "/var/tmp"))
    backing = work / "backing"
    size = args.size_mib << 20
    block = args.block_kib << 10
    try:
        _fill(backing, size)

        async def direct_file() -> float:
            _evict(backing, args.drop_caches)
            total, secs = _read_all(backing, block)
            assert total == size
            return total / secs

        def fuse_case(settings: AttachSettings, warm: bool) -> Callable[[], Awaitable[float]]:
            return lambda: _fuse_run(work, backing, block, settings, warm, args.drop_caches)

        cases: list[tuple[str, Callable[[], Awaitable[float]]]] = [
            ("backing file, read(2) (baseline)", direct_file),
            ("FUSE image, direct_io (default)", fuse_case(AttachSettings(), False)),
            (
                "FUSE image, page cache + 1 MiB readahead",
                fuse_case(AttachSettings(fuse_direct_io=False), False),
            ),
            (
                "FUSE image, page cache + 128 KiB readahead (kernel default)",
                fuse_case(AttachSettings(fuse_direct_io=False, fuse_readahead_kb=0), False),
            ),
            (
                "FUSE image, direct_io, warm backing file (FUSE overhead only)",
                fuse_case(AttachSettings(), True),
            ),
        ]
        if not args.no_ext4:
            image = work / "ext4.img"
            data = await _ext4_prepare(work, image, size, (args.size_mib // 2) << 20)
            cases.append(
                (
                    f"{args.size_mib // 2} MiB file in ext4 on loop on the FUSE image (defaults)",
                    lambda: _ext4_run(work, image, data, block, args.drop_caches),
                )
            )
        # Interleaved runs: the machine's background load then weighs on every row alike.
        rates: dict[str, list[float]] = {label: [] for label, _ in cases}
        for _ in range(args.runs):
            for label, run in cases:
                rates[label].append(await run())
        rows = [(label, (statistics.median(r), min(r), max(r))) for label, r in rates.items()]

        base = rows[0][1][0]
        load = os.getloadavg()[0]
        print(
            f"Cold sequential read of a fully present {args.size_mib} MiB image, "
            f"{args.block_kib} KiB reads, median of {args.runs} interleaved runs "
            f"({'drop_caches' if args.drop_caches else 'fadvise DONTNEED + fresh mount'}; "
            f"{os.cpu_count()} CPUs, load average {load:.1f})\n"
        )
        print("| path | MB/s (median) | min | max | vs baseline |")
        print("|---|---:|---:|---:|---:|")
        for label, (med, lo, hi) in rows:
            print(
                f"| {label} | {med / 1e6:.0f} | {lo / 1e6:.0f} | {hi / 1e6:.0f} "
                f"| {med / base:.2f}x |"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

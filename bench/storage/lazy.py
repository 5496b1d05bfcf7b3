"""Lazy-volume benchmark: first-read latency of a missing block, and background fill rate.

    .venv/bin/python bench/storage/lazy.py [--size-mib 256] [--reads 400] [--rounds 3] [--tls]
        [--batch N] [--inflight N] [--connections N] [--workers N]

* **first read of a missing 64 KiB block**: a lazy volume whose fill is not running reads
  64 KiB at random missing blocks (each one fetched from the source over NBD, stored,
  marked present, then read locally); p50/p90/p99 per read. Target: p50 <= 1 ms.
* **background fill**: a fresh lazy volume fills the whole size (unlimited rate; the time
  includes the final flush) vs ``os.copy_file_range`` of the same bytes into a new file
  plus ``fsync``, measured in the same run. Target: >= 60% of the copy rate.

The source is our NBD server in a separate process over loopback (``--tls``: with fleet
certificates, as between hosts), with the agent's default worker threads (``--workers``).
The fill uses the lazy-volume defaults unless ``--batch``/``--inflight``/``--connections``
say otherwise. Source and baseline read the same page-cached file, so
both sides compare copying, not the disk. Prints a markdown table to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from edgevisor.pki import FleetCA, HostIdentity
from edgevisor.storage.lazy import LazySettings, LazyVolume, RemoteSource
from edgevisor.storage.nbd_client import NBDClient
from edgevisor.storage.nbd_server import NBDServerSettings
from edgevisor.storage.volume import Volume

MiB = 1 << 20
BS = 64 * 1024

SERVE = r"""
import asyncio, sys
from pathlib import Path
from edgevisor.pki import HostIdentity
from edgevisor.storage.volume import Volume
from edgevisor.storage.nbd_server import Export, NBDServer

async def main() -> None:
    vol = Volume.open(sys.argv[1])
    pki = sys.argv[3]
    ctx = HostIdentity(Path(pki), "source").server_context() if pki else None
    srv = NBDServer(ssl_context=ctx, tls_required=bool(pki), workers=int(sys.argv[4]))
    peers = frozenset({"target"}) if pki else None
    srv.add_export(Export("vol", vol, allowed_peers=peers))
    await srv.start("127.0.0.1", int(sys.argv[2]))
    print("ready", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await srv.aclose()
        vol.close()

asyncio.run(main())
"""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_source(path: Path, size: int) -> None:
    vol = Volume.create(path, size, BS)
    vol.close()
    block = os.urandom(MiB)
    with open(path / "data", "r+b") as f:
        for off in range(0, size, MiB):
            f.write(block[: min(MiB, size - off)])
        f.flush()
        os.fsync(f.fileno())


def copy_baseline(src: Path, dst: Path, size: int) -> float:
    """Seconds for copy_file_range of ``size`` bytes + fsync (the machine's raw copy)."""
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        t0 = time.perf_counter()
        left = size
        while left:
            n = os.copy_file_range(fi.fileno(), fo.fileno(), min(left, 64 * MiB))
            if n == 0:
                break
            left -= n
        os.fsync(fo.fileno())
        return time.perf_counter() - t0


async def run(args: argparse.Namespace, tmp: Path) -> list[tuple[str, str, str, str]]:
    size = args.size_mib * MiB
    src = tmp / "src"
    log(f"making a {args.size_mib} MiB source ...")
    make_source(src, size)
    os.posix_fadvise(os.open(src / "data", os.O_RDONLY), 0, 0, os.POSIX_FADV_WILLNEED)
    pki = ""
    client_ctx = None
    if args.tls:
        ca = FleetCA.load_or_create(tmp / "ca")
        for host in ("source", "target"):
            ident = HostIdentity(tmp / host, host)
            ident.store(ca.sign_host(host, ident.csr_pem()), ca.cert_pem)
        pki = str(tmp / "source")
        client_ctx = HostIdentity(tmp / "target", "target").client_context()
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVE, str(src), str(port), pki, str(args.workers)],
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    if proc.stdout.readline() != b"ready\n":
        raise RuntimeError("source server did not start")

    async def connect() -> RemoteSource:
        return await NBDClient.connect(
            "127.0.0.1", port, "vol", ssl_context=client_ctx, server_hostname="source"
        )

    try:
        # -- first reads of missing blocks (fill not running)
        lat: list[float] = []
        for r in range(args.rounds):
            dst = Volume.create(tmp / f"lat{r}", size, BS, present=False)
            lazy = LazyVolume(dst, connect, LazySettings(mirror="off"))
            await lazy.read(0, 4096)  # connect outside the measurement
            blocks = random.sample(range(1, size // BS), min(args.reads, size // BS - 1))
            for b in blocks:
                t0 = time.perf_counter()
                await lazy.read(b * BS, BS)
                lat.append(time.perf_counter() - t0)
            await lazy.aclose()
            await dst.aclose()
            shutil.rmtree(tmp / f"lat{r}")
        lat.sort()
        q = statistics.quantiles(lat, n=100)
        p50, p90, p99 = q[49] * 1e3, q[89] * 1e3, q[98] * 1e3
        log(f"first read p50 {p50:.3f} ms p90 {p90:.3f} ms p99 {p99:.3f} ms")

        # -- background fill vs copy_file_range, alternating, best of rounds
        fills: list[float] = []
        copies: list[float] = []
        for r in range(args.rounds):
            copies.append(copy_baseline(src / "data", tmp / "copy", size))
            os.unlink(tmp / "copy")
            dst = Volume.create(tmp / f"fill{r}", size, BS, present=False)
            fill_cfg = LazySettings(
                mirror="off",
                fill_batch_blocks=args.batch,
                fill_inflight=args.inflight,
                fill_connections=args.connections,
            )
            lazy = LazyVolume(dst, connect, fill_cfg)
            t0 = time.perf_counter()
            lazy.start()
            await lazy.filled.wait()
            fills.append(time.perf_counter() - t0)
            await lazy.aclose()
            await dst.aclose()
            shutil.rmtree(tmp / f"fill{r}")
            log(f"round {r}: fill {size / fills[-1] / MiB:.0f} MiB/s, "
                f"copy_file_range {size / copies[-1] / MiB:.0f} MiB/s")  # fmt: skip
        fill_rate = size / min(fills) / MiB
        copy_rate = size / min(copies) / MiB
    finally:
        proc.terminate()
        proc.wait(30)
    link = "NBD+TLS" if args.tls else "NBD"
    return [
        ("first read of a missing 64 KiB block, p50", f"{p50:.3f} ms",
         f"p90 {p90:.3f} ms, p99 {p99:.3f} ms", "<= 1 ms"),
        (f"background fill ({link}, {args.size_mib} MiB)", f"{fill_rate:.0f} MiB/s",
         f"copy_file_range+fsync {copy_rate:.0f} MiB/s ({fill_rate / copy_rate:.0%})",
         ">= 60%"),
    ]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--reads", type=int, default=400, help="first reads per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tls", action="store_true", help="TLS with fleet certificates")
    ap.add_argument(
        "--batch",
        type=int,
        default=LazySettings().fill_batch_blocks,
        help="blocks per fill request",
    )
    ap.add_argument(
        "--inflight", type=int, default=LazySettings().fill_inflight, help="fill requests in flight"
    )
    ap.add_argument(
        "--connections",
        type=int,
        default=LazySettings().fill_connections,
        help="fill connections of their own (0: share the main one)",
    )
    ap.add_argument(
        "--workers",
        type=int,
        default=NBDServerSettings().worker_threads,
        help="source server worker threads (default: the agent's)",
    )
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="ev-lazy-bench-") as t:
        rows = asyncio.run(run(args, Path(t)))
    print("| measure | ours | baseline (same run) | target |")
    print("|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()

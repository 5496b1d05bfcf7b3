"""Lazy-volume benchmark: first-read latency of a missing block, and background fill rate.

    .venv/bin/python bench/storage/lazy.py [--size-mib 256] [--reads 400] [--rounds 3]
        [--links plain,tls,tls-inproc,tls-asyncio,tls12] [--batch N] [--inflight N]
        [--connections N] [--depth N] [--held]
        [--workers N]

* **first read of a missing 64 KiB block**: a lazy volume whose fill is not running reads
  64 KiB at random missing blocks (each one fetched from the source over NBD, stored,
  marked present, then read locally); p50/p90/p99 per read. Target: p50 <= 1 ms.
* **background fill**, one row per link: a fresh lazy volume fills the whole size
  (unlimited rate; the time includes the final flush) vs ``os.copy_file_range`` of the
  same bytes into a new file plus ``fsync``, measured in the same run, alternating with
  the fills (``--held``: timed from the release of a volume created held and started
  0.5 s before, as on a migration target, whose connections are open by then).
  Target: >= 60% of the copy rate. The source holds random bytes everywhere (no holes:
  every byte crosses the link; a sparse source fills faster, holes are not transferred).
  Links: ``plain`` (NBD over TCP), ``tls`` (NBD over TLS with fleet certificates, as
  between hosts; source server in another process, as on two hosts), ``tls-inproc`` (the
  same with the source server in this process, as in the migration bench's testbed: source
  and target share one GIL), ``tls-asyncio`` (as ``tls`` with the source's TLS sessions on
  asyncio's TLS transport instead of threads: the old path, for comparison in the same
  run), ``tls12`` (as ``tls`` with the source's bulk cipher policy: TLS 1.2 ECDHE
  AES-128-GCM instead of TLS 1.3 AES-256-GCM).

The source is our NBD server (a separate process unless ``-inproc``) over loopback, with
the agent's default worker threads (``--workers``). The fill uses the lazy-volume
defaults unless ``--batch``/``--inflight``/``--connections``/``--depth`` (reads in flight
per fill connection) say otherwise. Source and
baseline read the same page-cached file, so both sides compare copying, not the disk.
Each fill row also gives the process CPU seconds per GiB filled (this process, and the
source server's). Prints a markdown table to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import resource
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from edgevisor.pki import FleetCA, HostIdentity
from edgevisor.storage import lazy_lane
from edgevisor.storage.lazy import LazySettings, LazyVolume, RemoteSource
from edgevisor.storage.nbd_client import NBDClient
from edgevisor.storage.nbd_server import Export, NBDServer, NBDServerSettings
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
    srv = NBDServer(ssl_context=ctx, tls_required=bool(pki), workers=int(sys.argv[4]),
                    tls_threads=sys.argv[5] != "0", bulk_cipher=sys.argv[5] == "2")
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


def _cpu_s(pid: int | None = None) -> float:
    """CPU seconds (user + system) of this process, or of ``pid``."""
    if pid is None:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return ru.ru_utime + ru.ru_stime
    with open(f"/proc/{pid}/stat") as f:
        st = f.read().rsplit(")", 1)[1].split()
    return (int(st[11]) + int(st[12])) / os.sysconf("SC_CLK_TCK")


class _Source:
    """The source's NBD server: another process, or (``inproc``) on this loop."""

    def __init__(self, src: Path, tmp: Path, link: str, workers: int) -> None:
        self.src, self.tmp, self.link, self.workers = src, tmp, link, workers
        self.tls = link.startswith("tls")
        self.tls_mode = {"tls-asyncio": "0", "tls12": "2"}.get(link, "1")
        self.inproc = link.endswith("-inproc")
        self.client_ctx: ssl.SSLContext | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.server: NBDServer | None = None
        self.vol: Volume | None = None
        self.port = 0

    async def start(self) -> None:
        pki = ""
        if self.tls:
            ca = FleetCA.load_or_create(self.tmp / "ca")
            for host in ("source", "target"):
                ident = HostIdentity(self.tmp / host, host)
                if not ident.ready:
                    ident.store(ca.sign_host(host, ident.csr_pem()), ca.cert_pem)
            pki = str(self.tmp / "source")
            self.client_ctx = HostIdentity(self.tmp / "target", "target").client_context()
        if self.inproc:
            ctx = HostIdentity(Path(pki), "source").server_context() if pki else None
            self.vol = Volume.open(self.src)
            self.server = NBDServer(ssl_context=ctx, tls_required=self.tls, workers=self.workers)
            peers = frozenset({"target"}) if self.tls else None
            self.server.add_export(Export("vol", self.vol, allowed_peers=peers))
            _, self.port = await self.server.start("127.0.0.1", 0)
            return
        self.port = free_port()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                SERVE,
                str(self.src),
                str(self.port),
                pki,
                str(self.workers),
                self.tls_mode,
            ],
            stdout=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        if self.proc.stdout.readline() != b"ready\n":
            raise RuntimeError("source server did not start")

    def cpu_s(self) -> float:
        return _cpu_s(self.proc.pid) if self.proc is not None else 0.0

    async def connect(self) -> RemoteSource:
        return await NBDClient.connect(
            "127.0.0.1", self.port, "vol", ssl_context=self.client_ctx, server_hostname="source"
        )

    async def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(30)
        if self.server is not None:
            await self.server.aclose()
        if self.vol is not None:
            self.vol.close()


async def first_reads(args: argparse.Namespace, tmp: Path, source: _Source) -> list[float]:
    """Latency of reads of missing blocks (fill not running)."""
    size = args.size_mib * MiB
    lat: list[float] = []
    for r in range(args.rounds):
        dst = Volume.create(tmp / f"lat{r}", size, BS, present=False)
        lazy = LazyVolume(dst, source.connect, LazySettings(mirror="off"))
        await lazy.read(0, 4096)  # connect outside the measurement
        blocks = random.sample(range(1, size // BS), min(args.reads, size // BS - 1))
        for b in blocks:
            t0 = time.perf_counter()
            await lazy.read(b * BS, BS)
            lat.append(time.perf_counter() - t0)
        await lazy.aclose()
        await dst.aclose()
        shutil.rmtree(tmp / f"lat{r}")
    return sorted(lat)


async def fill_rounds(
    args: argparse.Namespace, tmp: Path, source: _Source
) -> tuple[float, float, float, float]:
    """Fill vs copy_file_range, alternating; best of rounds: (fill MiB/s, copy MiB/s,
    CPU s/GiB here, CPU s/GiB of a source process)."""
    size = args.size_mib * MiB
    fills: list[tuple[float, float, float]] = []
    copies: list[float] = []
    for r in range(args.rounds):
        copies.append(copy_baseline(source.src / "data", tmp / "copy", size))
        os.unlink(tmp / "copy")
        dst = Volume.create(tmp / f"fill{r}", size, BS, present=False)
        fill_cfg = LazySettings(
            mirror="off",
            fill_batch_blocks=args.batch,
            fill_inflight=args.inflight,
            fill_connections=args.connections,
        )
        lazy = LazyVolume(dst, source.connect, fill_cfg, held=args.held)
        if args.held:  # as on a migration target: created (and connected) before the switch
            lazy.start()
            await asyncio.sleep(0.5)
        c0, s0 = _cpu_s(), source.cpu_s()
        t0 = time.perf_counter()
        if args.held:
            lazy.release()
        else:
            lazy.start()
        await lazy.filled.wait()
        dt = time.perf_counter() - t0
        gib = size / (1 << 30)
        fills.append((dt, (_cpu_s() - c0) / gib, (source.cpu_s() - s0) / gib))
        await lazy.aclose()
        await dst.aclose()
        shutil.rmtree(tmp / f"fill{r}")
        log(f"{source.link} round {r}: fill {size / dt / MiB:.0f} MiB/s "
            f"(cpu {fills[-1][1]:.2f} + {fills[-1][2]:.2f} s/GiB), "
            f"copy_file_range {size / copies[-1] / MiB:.0f} MiB/s")  # fmt: skip
    best = min(fills)
    return size / best[0] / MiB, size / min(copies) / MiB, best[1], best[2]


_LINK_NAMES = {
    "plain": "NBD",
    "tls": "NBD+TLS, source in another process",
    "tls-inproc": "NBD+TLS, source in this process",
    "tls-asyncio": "NBD+TLS, source in another process, TLS sessions on asyncio",
    "tls12": "NBD+TLS 1.2 AES-128-GCM, source in another process",
    "plain-inproc": "NBD, source in this process",
}


async def run(args: argparse.Namespace, tmp: Path) -> list[tuple[str, str, str, str]]:
    size = args.size_mib * MiB
    src = tmp / "src"
    log(f"making a {args.size_mib} MiB source ...")
    make_source(src, size)
    os.posix_fadvise(os.open(src / "data", os.O_RDONLY), 0, 0, os.POSIX_FADV_WILLNEED)
    rows: list[tuple[str, str, str, str]] = []
    for i, link in enumerate(args.links.split(",")):
        if link not in _LINK_NAMES:
            raise SystemExit(f"unknown link {link!r}: one of {', '.join(_LINK_NAMES)}")
        source = _Source(src, tmp, link, args.workers)
        await source.start()
        try:
            if i == 0 and args.reads:
                lat = await first_reads(args, tmp, source)
                q = statistics.quantiles(lat, n=100)
                p50, p90, p99 = q[49] * 1e3, q[89] * 1e3, q[98] * 1e3
                log(f"first read p50 {p50:.3f} ms p90 {p90:.3f} ms p99 {p99:.3f} ms")
                rows.append((f"first read of a missing 64 KiB block ({_LINK_NAMES[link]}), p50",
                             f"{p50:.3f} ms", f"p90 {p90:.3f} ms, p99 {p99:.3f} ms",
                             "<= 1 ms"))  # fmt: skip
            fill, copy, cpu_here, cpu_src = await fill_rounds(args, tmp, source)
        finally:
            await source.stop()
        cpu = f"CPU {cpu_here:.2f} s/GiB" + (
            f" + source {cpu_src:.2f} s/GiB" if source.proc is not None else " (both ends)"
        )
        rows.append((f"background fill ({_LINK_NAMES[link]}, {args.size_mib} MiB; {cpu})",
                     f"{fill:.0f} MiB/s",
                     f"copy_file_range+fsync {copy:.0f} MiB/s ({fill / copy:.0%})",
                     ">= 60%"))  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--reads", type=int, default=400, help="first reads per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--links",
        default="plain,tls,tls-inproc",
        help=f"fill rows, comma-separated: {', '.join(_LINK_NAMES)}",
    )
    ap.add_argument("--tls", action="store_true", help="same as --links tls")
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
        "--depth",
        type=int,
        default=getattr(lazy_lane, "PIPELINE_DEPTH", 1),
        help="reads in flight per blocking fill lane (1: no pipelining)",
    )
    ap.add_argument(
        "--held",
        action="store_true",
        help="time each fill from the release of a volume created held and started 0.5 s "
        "earlier (a migration target's case: its connections are open by then)",
    )
    ap.add_argument(
        "--workers",
        type=int,
        default=NBDServerSettings().worker_threads,
        help="source server worker threads (default: the agent's)",
    )
    args = ap.parse_args()
    if hasattr(lazy_lane, "PIPELINE_DEPTH"):  # (an older tree, for a baseline, has none)
        lazy_lane.PIPELINE_DEPTH = args.depth  # read by each new fill's lanes
    if args.tls:
        args.links = "tls"
    with tempfile.TemporaryDirectory(prefix="ev-lazy-bench-") as t:
        rows = asyncio.run(run(args, Path(t)))
    print("| measure | ours | baseline (same run) | target |")
    print("|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()

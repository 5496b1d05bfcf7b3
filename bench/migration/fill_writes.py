"""Benchmark: the post-switch fill with 20% foreground writes, same run (root).

    sudo .venv/bin/python bench/migration/fill_writes.py [--sizes 64M,1G] [--share 0.2]

Same setup as ``run.py`` (a controller and two agents in this process, NBD over TLS on
loopback, the kv example domain, ``--written`` of the volume as a file of random data).
Per volume size, two post-copy migrations:

1. without foreground writes: switch -> synced (the runner's fill time) is the baseline;
2. with a writer inside the domain's filesystem on the target (its mount namespace),
   started as soon as the domain runs there and stopped when every block is present:
   1 MiB overwrites at random offsets of the data file, each fsync'd (so mirrored to the
   source before it returns), paced at ``--share`` (default 20%) of the data rate the
   fill reached in run 1. The writes land on blocks the fill has and has not fetched yet:
   a fetched block must never overwrite a newer local write.

After the second migration commits (its verify compared both copies' checksums), every
chunk the writer wrote last at each offset is read back on the target and compared: a
lost or stale write fails the bench. Reported: both fill times and rates, the slowdown,
the writes' achieved rate and their write+fsync latency p50/p99, next to
``os.copy_file_range`` of the same size.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as bench
from baselines import copy_file_range_s

from edgevisor import Client
from edgevisor.migration.runner import runner_for
from edgevisor.migration.testbed import Testbed, wait_serving
from edgevisor.sdk.volumes import parse_size

MiB = 1 << 20

# Overwrites 1 MiB chunks of PATH at random 1 MiB-aligned offsets below LIMIT, paced at
# RATE bytes/s, each write fsync'd; stops when stdin closes; prints one JSON line: the
# bytes and seconds, write+fsync latencies, and the sha256 of the last chunk per offset.
_WRITER = r"""
import hashlib, json, os, random, select, sys, time
path, rate, limit = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
rng = random.Random(11)
fd = os.open(path, os.O_WRONLY)
last, lat, spans, n, t0 = {}, [], [], 0, time.monotonic()
sys.stdout.write("started\n"); sys.stdout.flush()
while True:
    due = t0 + n * (1 << 20) / rate
    wait = max(0.0, due - time.monotonic())
    if select.select([sys.stdin], [], [], wait)[0]:
        break
    off = rng.randrange(0, limit >> 20) << 20
    chunk = os.urandom(1 << 20)
    w0 = time.monotonic()
    os.pwrite(fd, chunk, off)
    os.fsync(fd)
    w1 = time.monotonic()
    lat.append(w1 - w0)
    spans.append((w0, w1))
    last[off] = hashlib.sha256(chunk).hexdigest()
    n += 1
os.close(fd)
print(json.dumps({"bytes": n << 20, "seconds": time.monotonic() - t0, "lat": lat,
                  "spans": spans, "last": last}))
"""

_READBACK = r"""
import hashlib, json, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
offs = json.loads(sys.stdin.read())
print(json.dumps({o: hashlib.sha256(os.pread(fd, 1 << 20, int(o))).hexdigest() for o in offs}))
"""


def split(spans: list[list[float]], events: list[tuple[str, float, float]]) -> dict[str, Any]:
    """Per write+fsync of the writer: the target agent's writes and flushes inside it
    (count, time), the rest being the FUSE process, loop device, ext4 and scheduling.
    Medians over the writer's calls (both sides use CLOCK_MONOTONIC)."""
    rows = []
    for w0, w1 in spans:
        ws = [(a, b) for k, a, b in events if k == "write" and w0 <= a <= w1]
        fs = [(a, b) for k, a, b in events if k == "flush" and w0 <= a <= w1]
        t_w = sum(b - a for a, b in ws)
        t_f = sum(b - a for a, b in fs)
        rows.append((w1 - w0, len(ws), t_w, len(fs), t_f, (w1 - w0) - t_w - t_f))
    med = [bench.pct([r[i] for r in rows], 0.5) for i in range(6)] if rows else [0.0] * 6
    return {
        "total_ms": med[0] * 1e3,
        "agent_writes": med[1],
        "agent_write_ms": med[2] * 1e3,
        "agent_flushes": med[3],
        "agent_flush_ms": med[4] * 1e3,
        "elsewhere_ms": med[5] * 1e3,
    }


def start_writer(
    tb: Testbed, host: str, vid: str, rate: float, limit: int
) -> subprocess.Popen[str]:
    """The writer, started in the domain's filesystem on ``host`` (it writes until its
    stdin closes)."""
    w = subprocess.Popen(
        bench.on_ballast(tb, host, vid, _WRITER, str(rate), str(limit)),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert w.stdout is not None
    assert w.stdout.readline().strip() == "started"
    return w


def run_writer(
    tb: Testbed, host: str, vid: str, rate: float, limit: int, writes: int
) -> dict[str, Any]:
    """The writer alone for about ``writes`` writes at ``rate`` (at least 20 writes)."""
    w = start_writer(tb, host, vid, rate, limit)
    assert w.stdout is not None and w.stdin is not None
    time.sleep(max(writes, 20) * MiB / rate)
    w.stdin.close()
    out: dict[str, Any] = json.loads(w.stdout.read())
    w.wait(timeout=60)
    return out


def fill_done(tb: Testbed, host: str, vid: str) -> bool:
    try:
        lazy = tb.agents[host].agent.capability("volumes").info(vid).get("lazy")
    except Exception:  # released at the commit: done
        return True
    return lazy is None or bool(lazy["done"])


def migrate(
    tb: Testbed,
    c: Client,
    src: str,
    dst: str,
    size: int,
    written: float,
    tag: str,
    write_rate: float,
) -> dict[str, Any]:
    """One post-copy migration of a fresh kv domain; with ``write_rate`` > 0 the writer
    runs on the target during the fill. Returns the fill time and the writer's figures."""
    name = f"fw{size >> 20}{tag}"
    vid = f"bench.domain-{name}"
    d = c.create_domain(
        name,
        [bench.PY, "-I", "-S", "/task/kv.py", "--port", "8080"],
        size,
        app=bench.KV_APP,
        host=src,
    )
    assert d.address
    wait_serving(d.address)
    data_bytes = int(size * written) & ~(MiB - 1)
    bench.write_ballast(tb, src, vid, data_bytes)
    m = c.migrate_domain(name, dst, mode="post-copy")
    end = time.monotonic() + 300
    while c.get_migration(m.id).phase in ("requested", "preparing", "switching"):
        assert time.monotonic() < end, "the switch did not end"
        time.sleep(0.002)
    out: dict[str, Any] = {"data_bytes": data_bytes}
    writer = None
    lazy = None
    with contextlib.suppress(Exception):
        lazy = tb.agents[dst].agent.capability("volumes")._get(vid).lazy
    if write_rate > 0:
        writer = start_writer(tb, dst, vid, write_rate, data_bytes)
        assert writer.stdout is not None and writer.stdin is not None
        while not fill_done(tb, dst, vid) and time.monotonic() < end:
            time.sleep(0.005)
        writer.stdin.close()
        out["writer"] = json.loads(writer.stdout.read())
        writer.wait(timeout=60)
        stats = getattr(lazy, "stats", None)  # the target's lazy volume: where writes went
        if stats is not None:
            out["agent"] = stats.as_dict()
            out["split"] = split(out["writer"]["spans"], stats.events)
    while not (m := c.get_migration(m.id)).settled:
        assert time.monotonic() < end, "the migration did not settle"
        time.sleep(0.02)
    out.update(phase=m.phase, reason=m.reason, fill_s=runner_for(tb.ctl.state).fill_s.get(m.id))
    if writer is not None and m.phase == "committed":
        last = out["writer"]["last"]
        got = subprocess.run(
            bench.on_ballast(tb, dst, vid, _READBACK),
            input=json.dumps(list(last)),
            capture_output=True,
            text=True,
            check=True,
            timeout=300,
        )
        back = json.loads(got.stdout)
        out["lost"] = sum(1 for o, h in last.items() if back.get(o) != h)
        # Baseline: the same writer on the same domain after the commit (volume purely
        # local: no fill, no mirror), as many writes as during the fill.
        out["after"] = run_writer(tb, dst, vid, write_rate, data_bytes, len(out["writer"]["lat"]))
    c.remove_domain(name)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="64M,1G")
    ap.add_argument(
        "--share",
        type=float,
        default=0.2,
        help="foreground write rate as a share of the fill's rate without writes",
    )
    ap.add_argument("--written", type=float, default=0.75)
    ap.add_argument("--cleanup-delay-s", type=float, default=2.0)
    ap.add_argument("--fill-hold-s", type=float, default=None)
    args = ap.parse_args()
    if os.geteuid() != 0:
        bench.log("needs root (namespaces, cgroups, FUSE)")
        return 2
    root = Path(tempfile.mkdtemp(prefix="edgevisor-bench-fillw-"))
    tag = f"{os.getpid() % 10000}"
    src, dst = f"fw-a{tag}", f"fw-b{tag}"
    rows: list[str] = []
    after_rows: list[str] = []
    split_rows: list[str] = []
    failed = 0
    try:
        with bench.bench_testbed(root, [src, dst], args) as (tb, c):
            for size in [parse_size(s) for s in args.sizes.split(",")]:
                raw_s = copy_file_range_s(root, size)
                bench.log(f"{size >> 20} MiB: without foreground writes ...")
                quiet = migrate(tb, c, src, dst, size, args.written, "q", 0.0)
                if quiet["phase"] != "committed" or not quiet["fill_s"]:
                    bench.log(f"  {quiet['phase']}: {quiet['reason']}")
                    failed += 1
                    continue
                rate = args.share * quiet["data_bytes"] / quiet["fill_s"]
                bench.log(f"  fill {quiet['fill_s']:.2f} s; writer at {rate / 1e6:.0f} MB/s ...")
                busy = migrate(tb, c, src, dst, size, args.written, "w", rate)
                w = busy.get("writer", {})
                if busy["phase"] != "committed" or busy.get("lost", 1) or not busy["fill_s"]:
                    bench.log(f"  {busy['phase']}: {busy['reason']}; lost {busy.get('lost')}")
                    failed += 1
                    continue
                lat = w["lat"]
                achieved = w["bytes"] / w["seconds"] if w["seconds"] else 0.0
                if "agent" in busy:
                    bench.log(f"  target's lazy volume: {json.dumps(busy['agent'])}")
                    sp = busy["split"]
                    bench.log(
                        "  per write+fsync (medians): {total_ms:.1f} ms = agent "
                        "{agent_writes:.0f} writes {agent_write_ms:.1f} ms + "
                        "{agent_flushes:.0f} flushes {agent_flush_ms:.1f} ms + elsewhere "
                        "{elsewhere_ms:.1f} ms".format(**sp)
                    )
                    split_rows.append(
                        f"| {size >> 20} MiB | {sp['total_ms']:.1f} ms | "
                        f"{sp['agent_writes']:.0f} / {sp['agent_write_ms']:.1f} ms | "
                        f"{sp['agent_flushes']:.0f} / {sp['agent_flush_ms']:.1f} ms | "
                        f"{sp['elsewhere_ms']:.1f} ms |"
                    )
                a = busy.get("after") or {"lat": [], "bytes": 0, "seconds": 0.0}
                a_rate = a["bytes"] / a["seconds"] if a["seconds"] else 0.0
                after_rows.append(
                    f"| {size >> 20} MiB | during the fill (mirrored) | "
                    f"{achieved / 1e6:.0f} MB/s ({len(lat)} writes) | "
                    f"{bench.ms(bench.pct(lat, 0.5))} / {bench.ms(bench.pct(lat, 0.99))} |\n"
                    f"| {size >> 20} MiB | after the commit (local only) | "
                    f"{a_rate / 1e6:.0f} MB/s ({len(a['lat'])} writes) | "
                    f"{bench.ms(bench.pct(a['lat'], 0.5))} / "
                    f"{bench.ms(bench.pct(a['lat'], 0.99))} |"
                )
                q_s, b_s = quiet["fill_s"], busy["fill_s"]
                rows.append(
                    f"| {size >> 20} MiB | {q_s:.2f} s ({size / q_s / 1e6:.0f} MB/s) | "
                    f"{b_s:.2f} s ({size / b_s / 1e6:.0f} MB/s) | "
                    f"{b_s / q_s:.2f}x | {achieved / 1e6:.0f} MB/s "
                    f"({w['bytes'] >> 20} MiB in {len(lat)} writes) | "
                    f"{bench.ms(bench.pct(lat, 0.5))} / {bench.ms(bench.pct(lat, 0.99))} | "
                    f"{len(w['last'])} of {len(w['last'])} | "
                    f"{raw_s:.2f} s ({size / raw_s / 1e6:.0f} MB/s) |"
                )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(
        f"Per volume ({args.written:.0%} written with random data before it migrated), two "
        f"post-copy migrations: the fill (switch -> synced) without foreground writes, "
        f"then with a writer in the domain's filesystem on the target overwriting 1 MiB "
        f"chunks at random offsets of the data, each fsync'd (mirrored to the source "
        f"before it returns), paced at {args.share:.0%} of the first fill's data rate "
        f"until every block is present. Afterwards the last chunk written at each offset "
        f"is read back on the target and compared.\n"
    )
    print(
        "| volume | fill, no writes | fill with foreground writes | slowdown | writes "
        "achieved | write+fsync p50 / p99 | chunks read back intact | os.copy_file_range |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(r)
    print(
        "\nThe same writer (same rate, as many writes) on the same domain after the "
        "migration committed (no fill, no mirror): the cost of mirroring.\n"
    )
    print("| volume | when | writes achieved | write+fsync p50 / p99 |")
    print("|---|---|---|---|")
    for r in after_rows:
        print(r)
    if split_rows:
        print(
            "\nWhere one write+fsync goes during the fill (medians over the writer's calls): "
            "the target agent's lazy-volume writes and flushes inside it, and the rest "
            "(FUSE process, loop device, ext4, scheduling).\n"
        )
        print("| volume | write+fsync | agent writes / time | agent flushes / time | elsewhere |")
        print("|---|---|---|---|---|")
        for r in split_rows:
            print(r)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

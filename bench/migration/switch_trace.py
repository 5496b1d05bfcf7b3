"""A timeline of one post-copy switch of the kv example, step by step (root).

    sudo .venv/bin/python bench/migration/switch_trace.py [--size 64M] [--repeat 1]
        [--strace] [--written 0.75] [--keep-log PATH]
        [--compare-prefetch | --compare-fill-rate | --compare-staged-mount]

Same setup as ``run.py`` (a controller and two agents in this process, the kv example
domain, a client probing every 1 ms); for each migration it prints, in ms from
QuiesceSource issued, every step up to the client's first answer from the target:

* the runner's commands (spans), the source quiesce's and the target start's sub-steps
  (``Domain.timings``), the target attach's layers;
* the lazy volume's release and every on-demand fetch on the target (the fill's lane
  fetches are counted apart): offset, blocks, latency;
* with ``--strace``: the service's own syscalls (``strace -f -ttt`` around the command:
  execve, the opens of its imports and of its data, bind/listen, the first accept) -
  this slows the service itself a little, so compare with a run without it;
* the client's last answer from the source and first from the target.

* the target volume's own reads, writes and flushes between the release and StartOnTarget
  done (the mount's: its superblock write and the flush it forces are part of the mount).

``--compare-prefetch`` alternates runs with and without the target's hot-set prefetch
(:mod:`edgevisor.migration.domain_hot`), ``--compare-fill-rate`` runs whose fill is held
at its trickle from the release until StartFill with runs at full rate from the release,
``--compare-staged-mount`` the direct mount of the staged FUSE process and loop device with
the old re-probing attach; each ends with a table of medians of both (downtime and fill).

Instrumentation is by wrapping methods in this process only (no code of the platform
changes for it).
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as bench

import edgevisor.agent.migration as agent_migration
from edgevisor import Client
from edgevisor.migration.testbed import Testbed, http, wait_serving
from edgevisor.sdk.volumes import parse_size
from edgevisor.storage.attach import AttachedVolume
from edgevisor.storage.lazy import LazyVolume

_TRACED = "execve,openat,bind,listen,accept4,fsync,ftruncate,truncate,read,newfstatat,lseek"
Event = tuple[float, str]
EVENTS: list[Event] = []
FETCHES: list[tuple[float, float, int, int, bool]] = []  # t0, t1, first, count, lane
READS: list[tuple[float, float, int, int]] = []  # the target volume's reads: t0, t1, off, len
OTHER: list[tuple[float, float, str]] = []  # the target volume's writes and flushes
SOURCE_IO: list[tuple[float, float, str]] = []  # local volumes' writes and flushes (--volume-io)
_VOLUME_IO = [False]


_PREFETCH = [True]


def summarize(what: str, results: dict[str, list[dict[str, float | None]]]) -> None:
    print(f"\n| {what} | runs | client downtime p50 | runner p50 | service up p50 "
          "| misses after StartOnTarget p50 | target volume p50 | quiesce p50 "
          "| fill (StartOnTarget done -> synced) p50 |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for label, rs in results.items():
        if not rs:
            continue
        col = {k: sorted(v for r in rs if (v := r[k]) is not None) for k in rs[0]}
        p50 = {k: (v[(len(v) - 1) // 2] if v else None) for k, v in col.items()}
        miss = p50["misses_after_start"]
        print(f"| {label} | {len(rs)} | {bench.ms(p50['client'])} | "
              f"{bench.ms(p50['runner'])} | {bench.ms(p50['service'])} | "
              f"{'-' if miss is None else int(miss)} | {bench.ms(p50['start_volume'])} | "
              f"{bench.ms(p50['quiesce'])} | {bench.ms(p50['fill'])} |")  # fmt: skip
    for label, rs in results.items():
        print(f"{label}: client downtimes " + ", ".join(bench.ms(r["client"]) for r in rs)
              + "; fills " + ", ".join(bench.ms(r["fill"]) for r in rs))  # fmt: skip


def _instrument() -> None:
    import edgevisor.agent.migration as agent_migration

    orig_hot = agent_migration.hot_ranges

    def hot_ranges(*args: Any, **kwargs: Any) -> Any:
        return orig_hot(*args, **kwargs) if _PREFETCH[0] else []

    agent_migration.hot_ranges = hot_ranges  # type: ignore[assignment]
    orig_fetch = LazyVolume._fetch_run
    orig_release = LazyVolume.release

    async def fetch_run(self: LazyVolume, first: int, count: int, futs: Any, deadline: float,
                        *, lanes: Any = None) -> None:  # fmt: skip
        t0 = time.monotonic()
        try:
            await orig_fetch(self, first, count, futs, deadline, lanes=lanes)
        finally:
            FETCHES.append((t0, time.monotonic(), first, count, lanes is not None))

    def release(self: LazyVolume) -> None:
        if self.held:
            EVENTS.append((time.monotonic(), "target lazy volume released"))
        orig_release(self)

    orig_read = LazyVolume.read

    async def read(self: LazyVolume, offset: int, length: int) -> bytes:
        t0 = time.monotonic()
        try:
            return await orig_read(self, offset, length)
        finally:
            READS.append((t0, time.monotonic(), offset, length))

    orig_write, orig_flush = LazyVolume.write, LazyVolume.flush

    async def write(self: LazyVolume, offset: int, data: bytes, *, fua: bool = False) -> None:
        t0 = time.monotonic()
        try:
            await orig_write(self, offset, data, fua=fua)
        finally:
            OTHER.append(
                (t0, time.monotonic(), f"write {offset} +{len(data)}{' fua' if fua else ''}")
            )

    async def flush(self: LazyVolume) -> None:
        t0 = time.monotonic()
        try:
            await orig_flush(self)
        finally:
            OTHER.append((t0, time.monotonic(), "flush"))

    from edgevisor.storage.volume import Volume

    orig_vflush = Volume.flush

    async def vflush(self: Volume) -> None:
        t0 = time.monotonic()
        try:
            await orig_vflush(self)
        finally:
            OTHER.append((t0, time.monotonic(), f"local flush of {Path(self.path).parent.name}"))

    orig_vwrite = Volume.write
    orig_vnowait = Volume.write_nowait

    def _host(v: Volume) -> str:
        return next((part for part in Path(v.path).parts if part.startswith("trace-")), "?")

    async def vwrite(self: Volume, offset: int, data: bytes, *, fua: bool = False) -> None:
        t0 = time.monotonic()
        try:
            await orig_vwrite(self, offset, data, fua=fua)
        finally:
            SOURCE_IO.append((t0, time.monotonic(), f"{_host(self)} write {offset} +{len(data)}"))

    def vnowait(self: Volume, offset: int, data: Any) -> bool:
        t0 = time.monotonic()
        ok = orig_vnowait(self, offset, data)
        if ok:
            SOURCE_IO.append((t0, time.monotonic(), f"{_host(self)} write {offset} +{len(data)}"))
        return ok

    async def vflush2(self: Volume) -> None:
        t0 = time.monotonic()
        try:
            await vflush(self)
        finally:
            SOURCE_IO.append((t0, time.monotonic(), f"{_host(self)} flush"))

    Volume.write = vwrite  # type: ignore[method-assign]
    Volume.write_nowait = vnowait  # type: ignore[method-assign]
    Volume.flush = vflush2  # type: ignore[method-assign]
    LazyVolume.read = read  # type: ignore[method-assign]
    LazyVolume.write = write  # type: ignore[method-assign]
    LazyVolume.flush = flush  # type: ignore[method-assign]
    LazyVolume._fetch_run = fetch_run  # type: ignore[method-assign]
    LazyVolume.release = release  # type: ignore[method-assign]


_STRACE_LINE = re.compile(r"^(?:\[pid\s+(\d+)\]\s+|(\d+)\s+)?(\d+\.\d+)\s+(.*)$")


def strace_events(log_path: Path, since_wall: float, mono_minus_wall: float) -> list[Event]:
    """Interesting lines of the strace output in the domain's log (after ``since_wall``)."""
    out: list[Event] = []
    seen_open = 0
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return out
    for line in text.splitlines():
        m = _STRACE_LINE.match(line)
        if not m:
            continue
        wall, call = float(m.group(3)), m.group(4)
        if wall < since_wall:
            continue
        t = wall + mono_minus_wall
        if call.startswith("execve("):
            out.append((t, "service: " + call[:90]))
        elif call.startswith("openat(") and "/data" in call:
            out.append((t, "service: " + call[:110]))
        elif call.startswith("openat("):
            seen_open += 1
            if seen_open in (1, 10, 20, 40, 80, 120):
                out.append((t, f"service: open #{seen_open}: {call[:80]}"))
        elif call.startswith(("bind(", "listen(", "accept", "fsync", "ftruncate")):
            out.append((t, "service: " + call[:80]))
        elif call.startswith("+++ exited"):
            out.append((t, "service: " + call))
    return out


def one(tb: Testbed, c: Client, src: str, dst: str, size: int, run: int, written: float,
        strace: bool, keep_log: str | None = None) -> dict[str, float | None]:  # fmt: skip
    cmd = [bench.PY, "-I", "-S", "/task/kv.py", "--port", "8080"]
    if strace:
        cmd = ["/usr/bin/strace", "-f", "-ttt", "--seccomp-bpf",
               "-e", f"trace={_TRACED}", "-T", *cmd]  # fmt: skip
    name = f"t{size >> 20}x{run}"
    d = c.create_domain(name, cmd, size, app=bench.KV_APP, host=src)
    assert d.address
    wait_serving(d.address)
    for i in range(50):
        http("PUT", f"http://{d.address}:8080/kv/k{i}", os.urandom(512).hex().encode())
    qualified, vid = f"bench.{name}", f"bench.domain-{name}"
    bench.write_ballast(tb, src, vid, int(size * written) & ~4095)
    src_domain = tb.agents[src].agent.capability("domains").domains[qualified]
    dst_domains = tb.agents[dst].agent.capability("domains").domains

    def target_addr() -> str | None:
        dd = dst_domains.get(qualified)
        return str(dd.address) if dd is not None else None

    prober = bench.Prober(c, name, target_addr)
    prober.t.start()
    prober.ready.wait(30)
    time.sleep(0.5)
    EVENTS.clear()
    FETCHES.clear()
    READS.clear()
    OTHER.clear()
    SOURCE_IO.clear()
    wall0, mono0 = time.time(), time.monotonic()
    m = c.migrate_domain(name, dst, mode="post-copy")
    end = time.monotonic() + 120
    while not (m := c.get_migration(m.id)).settled:
        assert time.monotonic() < end
        time.sleep(0.02)
    time.sleep(0.3)
    prober.stop.set()
    prober.t.join(5)
    moved = c.get_domain(name)
    runner = bench.runner_for(tb.ctl.state)
    spans = runner.spans.get(m.id, [])
    ev: list[Event] = list(EVENTS)
    for label, t0, t1 in spans:
        ev.append((t0, f"runner: {label} issued"))
        ev.append((t1, f"runner: {label} done ({(t1 - t0) * 1000:.1f} ms)"))
    last_src, first_dst = bench.switch_edges(prober.answers, d.address, moved.address or "")
    for t0, addr, dt, _why in prober.slow_fails:
        side = "source" if addr == d.address else "target"
        ev.append((t0, f"client: a probe of the {side} failed after {dt * 1000:.0f} ms"))
    if last_src:
        ev.append((last_src, "client: last answer from the source"))
    if first_dst:
        ev.append((first_dst, "client: first answer from the target"))
    dst_domain = dst_domains.get(qualified)
    if strace and dst_domain is not None:
        ev += strace_events(dst_domain.log_path, wall0, mono0 - wall0)
        if keep_log:
            shutil.copy(dst_domain.log_path, keep_log)
    q0 = next((t0 for label, t0, _t1 in spans if label == "QuiesceSource"), mono0)
    release = next((t for t, what in EVENTS if "released" in what), None)
    demand = [f for f in FETCHES if not f[4] and (release is None or f[0] >= release - 0.001)]
    lane = [f for f in FETCHES if f[4]]
    horizon = first_dst or (q0 + 2)
    for t0, t1, first, count, _ in demand:
        if t0 <= horizon:
            ev.append((t0, f"target: on-demand fetch block {first} x{count}: "
                           f"{(t1 - t0) * 1000:.1f} ms"))  # fmt: skip
    print(f"\n== {size >> 20} MiB run {run + 1}: client downtime "
          f"{bench.ms(prober.downtime(d.address, moved.address or ''))}, runner "
          f"{bench.ms(m.downtime_s)}; slowest failed probe "
          f"{bench.ms(prober.slowest_fail_s)}")  # fmt: skip
    for t0, t1, what in OTHER:
        if release is not None and release <= t0 <= horizon:
            ev.append((t0, f"target volume: {what}: {(t1 - t0) * 1000:.1f} ms"))
    if _VOLUME_IO[0]:
        sod0 = next((t0 for label, t0, _t1 in spans if label == "StartOnTarget"), horizon)
        for t0, t1, what in SOURCE_IO:
            if q0 - 0.01 <= t0 <= sod0:
                ev.append((t0, f"local volume: {what}: {(t1 - t0) * 1000:.1f} ms"))
    for t, what in sorted(ev):
        if q0 - 0.3 <= t <= horizon + 0.01:
            print(f"  {(t - q0) * 1000:8.1f} ms  {what}")
    before = [f for f in demand if f[0] <= horizon]
    lat = sorted((f[1] - f[0]) * 1000 for f in before)
    if lat:
        print(f"  on-demand fetches before the first answer: {len(lat)}, "
              f"{sum(f[3] for f in before)} blocks, latency p50 {lat[len(lat) // 2]:.1f} ms, "
              f"max {lat[-1]:.1f} ms, sum {sum(lat):.1f} ms")  # fmt: skip
    sod_t = next((t1 for label, _t0, t1 in spans if label == "StartOnTarget"), None)
    if release is not None and sod_t is not None:
        # reads of the volume (the mount's and the service's, through FUSE) in the switch
        rs = [r for r in READS if release <= r[0] <= sod_t]
        lat = sorted((r[1] - r[0]) * 1000 for r in rs)
        gaps = [(b[0] - a[1]) * 1000 for a, b in itertools.pairwise(rs)]
        if lat:
            print(f"  volume reads release -> StartOnTarget done: {len(rs)}, "
                  f"{sum(r[3] for r in rs) >> 10} KiB, in the agent p50 {lat[len(lat) // 2]:.2f}"
                  f" ms, sum {sum(lat):.1f} ms; first at +{(rs[0][0] - release) * 1000:.1f}, "
                  f"last done +{(rs[-1][1] - release) * 1000:.1f} ms; gaps between reads sum "
                  f"{sum(g for g in gaps if g > 0):.1f} ms")  # fmt: skip
    lane_before = [f for f in lane if f[0] <= horizon]
    print(
        f"  fill lane fetches started before the first answer: {len(lane_before)}, "
        f"{sum(f[3] for f in lane_before)} blocks"
    )
    for what, timing in (("source quiesce", src_domain.timings.get("quiesce", {})),
                         ("target start", dst_domain.timings.get("start", {})
                          if dst_domain else {})):  # fmt: skip
        print(f"  {what}: " + ", ".join(f"{k} {v * 1000:.1f}" for k, v in timing.items()))
    try:
        att = tb.agents[dst].agent.capability("volumes")._get(vid).attached
        print("  target attach: " + ", ".join(f"{k} {v * 1000:.1f}"
                                             for k, v in att.timings.items()))  # fmt: skip
    except Exception:  # internals; informative only
        pass
    c.remove_domain(name)
    sod = next((t1 for label, _t0, t1 in spans if label == "StartOnTarget"), None)
    return {
        "client": prober.downtime(d.address, moved.address or ""),
        "runner": m.downtime_s,
        "service": first_dst - sod if first_dst and sod else None,
        "misses_after_start": float(sum(1 for f in demand if sod and sod <= f[0] <= horizon)),
        "start_volume": (dst_domain.timings.get("start", {}) if dst_domain else {}).get("volume"),
        "quiesce": src_domain.timings.get("quiesce", {}).get("total"),
        "fill": runner.fill_s.get(m.id),
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="64M")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--written", type=float, default=0.75)
    ap.add_argument("--strace", action="store_true")
    ap.add_argument("--keep-log", default=None, help="copy the target domain's log here")
    ap.add_argument("--cleanup-delay-s", type=float, default=2.0)
    ap.add_argument("--fill-hold-s", type=float, default=None)
    ap.add_argument(
        "--compare-prefetch",
        action="store_true",
        help="alternate runs with and without the hot-set prefetch (same run, A/B)",
    )
    ap.add_argument(
        "--compare-fill-rate",
        action="store_true",
        help="alternate runs whose target fill is held at its trickle from the release "
        "until StartFill (the code's choice) with runs at the migration's rate from the "
        "release (same run, A/B: downtime and fill)",
    )
    ap.add_argument(
        "--compare-staged-mount",
        action="store_true",
        help="alternate runs whose target mounts the staged FUSE process and loop device "
        "directly (the code's choice) with runs that re-probe and re-find them first",
    )
    ap.add_argument(
        "--compare-fill-hold",
        type=float,
        default=None,
        metavar="S",
        help="alternate runs whose target holds the fill at its trickle until the domain "
        "listens (``domains.fill_hold_s`` = S) with runs that do not (0): same run, A/B",
    )
    ap.add_argument(
        "--volume-io",
        action="store_true",
        help="also list every local volume's writes and flushes from QuiesceSource issued "
        "to StartOnTarget issued (the source's seal)",
    )
    args = ap.parse_args()
    _VOLUME_IO[0] = args.volume_io
    if os.geteuid() != 0:
        print("needs root", file=sys.stderr)
        return 2
    _instrument()
    size = parse_size(args.size)
    root = Path(tempfile.mkdtemp(prefix="edgevisor-switch-trace-"))
    tag = f"{os.getpid() % 10000}"
    src, dst = f"trace-a{tag}", f"trace-b{tag}"
    try:
        with bench.bench_testbed(root, [src, dst], args) as (tb, c):
            results: dict[str, list[dict[str, float | None]]] = {}
            trickle = agent_migration._TRICKLE
            staged_up = AttachedVolume._staged_layers_up
            for i in range(args.repeat):
                # A/B in one run: odd runs without the hot-set prefetch, or with the
                # fill at the migration's rate from the release (None: that rate)
                on = not (args.compare_prefetch and i % 2)
                _PREFETCH[0] = on
                full = args.compare_fill_rate and i % 2 == 1
                agent_migration._TRICKLE = None if full else trickle  # type: ignore[assignment]
                legacy = args.compare_staged_mount and i % 2 == 1
                AttachedVolume._staged_layers_up = (  # type: ignore[method-assign]
                    (lambda self: False) if legacy else staged_up
                )
                if args.compare_fill_hold is not None:
                    hold = args.compare_fill_hold if i % 2 == 0 else 0.0
                    doms = tb.agents[dst].agent.capability("domains")
                    doms.cfg = doms.cfg.model_copy(update={"fill_hold_s": hold})
                    label = f"fill held until listening (<= {hold:g} s)" if hold else "no hold"
                elif args.compare_staged_mount:
                    label = "staged mount re-probed" if legacy else "staged mount direct"
                elif args.compare_fill_rate:
                    label = "full rate from release" if full else "trickle until StartFill"
                else:
                    label = f"prefetch {'on' if on else 'off'}"
                print(f"\n-- {label}")
                r = one(tb, c, src, dst, size, i, args.written, args.strace, args.keep_log)
                results.setdefault(label, []).append(r)
            what = "fill" if args.compare_fill_rate else "prefetch"
            what = "fill hold" if args.compare_fill_hold is not None else what
            summarize("mount" if args.compare_staged_mount else what, results)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

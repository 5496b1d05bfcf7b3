"""Benchmark: live migration (post-copy) vs the stop-and-copy baseline, same run (root).

    sudo .venv/bin/python bench/migration/run.py [--sizes 64M,1G,4G] [--modes post-copy]

Setup: a controller and two full agents in this process (:mod:`edgevisor.migration.
testbed`: own data dirs, NBD over TLS on loopback), the kv example domain (a Python HTTP
service, fsync'd log on its ext4 volume). For each volume size and mode:

* **switch downtime**: a client probes ``GET /kv/probe`` every 1 ms; downtime is the time
  from the last answer served by the source to the first served by the target (the domain
  has a per-host address here, so the answering host is known). The client is a process
  of its own (``prober.py``: a thread of this process shared the GIL with both agents and
  measured them). Also the runner's own figure (QuiesceSource issued -> StartOnTarget
  done). ``--probes`` logs every probe of the switch with how it failed (the step and the
  errno: a SYN that got nothing back would show as a connect timeout).
* **switch -> synced**: post-copy, from the target's release of the volume (early in
  StartOnTarget: the source is final from then on) to every block present, as the target
  agent times it; the domain's start (mount, spawn) and the StartFill command are in it;
  compared with ``os.copy_file_range`` of a file of the same size on the same disk. The
  fill skips what the source holds as holes, so an empty volume would flatter it (and the
  stop-and-copy baseline): before migrating, ``--written`` of the volume (default 75%) is
  written as a file of random data inside the domain's filesystem.
* **reads during post-sync**: 4 KiB reads at random offsets of the target's volume (the
  block device the domain's filesystem sits on) while the fill runs, split by whether
  the block was present when read; p50/p99. Sampled from the target's first answer on:
  the sampler runs on the target agent's loop, which also serves the starting domain's
  reads, so earlier it would add to the downtime it is not part of.

* **where the switch goes** (post-copy): the runner's commands on the client's timeline
  and the domain runtime's sub-steps on both hosts (``Domain.timings``): the source's
  flush ahead of the switch (PrepareTarget's last op, while the domain still serves), its
  quiesce (whose own ``preflush`` then finds little to write), the target's start
  (volume attach, network, sandbox), then the service's own start-up until its first
  answer, and how long the target held the fill at its trickle for that start-up
  (``domains.fill_hold_s``). Per step on stderr; a summary table on stdout.

Prints markdown tables to stdout (progress and the per-step breakdown to stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgevisor import Client
from edgevisor.migration.domain_config import DomainsSettings
from edgevisor.migration.runner import runner_for
from edgevisor.migration.testbed import (
    Testbed,
    free_test_subnet,
    http,
    open_testbed,
    wait_serving,
)
from edgevisor.sdk.volumes import parse_size
from edgevisor.testing.controller import free_port

sys.path.insert(0, str(Path(__file__).resolve().parent))  # however this file is loaded
from baselines import copy_file_range_s, tls_stream_s
from prober import probe_why

ROOT = Path(__file__).resolve().parents[2]
KV_APP = ROOT / "examples" / "domains" / "kv"
PY = os.path.realpath(sys.executable)
KiB = 1 << 10


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Prober:
    """The client of the switch: ``GET /kv/probe`` every 1 ms, from a process of its own
    (:mod:`prober`, which says why: a thread here shared the agents' GIL and measured
    it); remembers the first and last success per address.

    Probes the source's address; once that fails, alternates with the target's (known
    from the target agent once prepared, ``target_addr``, and passed on to the prober at
    once), so the first answer there is seen without a round trip to the controller.
    The bench subnets have ``unreachable`` routes in the root namespace
    (:func:`claim_subnets`): a probe of an address whose domain is gone fails at once,
    instead of waiting out its timeout on a SYN sent towards the default gateway.

    ``t`` (a thread here) starts the prober, passes the target's address on, and at
    ``stop`` collects every probe; ``first_ok`` fills as the prober reports first answers.
    """

    def __init__(self, c: Client, name: str, target_addr: Any = None) -> None:
        self.c, self.name = c, name
        self.target_addr = target_addr or (lambda: None)
        self.last_ok: dict[str, float] = {}
        self.first_ok: dict[str, float] = {}
        self.answers: list[tuple[float, str]] = []  # (time, address) of every success
        self.slowest_fail_s = 0.0  # longest failed probe (a blind spot of the client)
        # (start, address, s, how it failed) of each failed probe slower than 50 ms
        self.slow_fails: list[tuple[float, str, float, str]] = []
        # every probe: (start, end, address, status code or 0, how it failed)
        self.log: list[tuple[float, float, str, int, str]] = []
        self.stop = threading.Event()
        self.ready = threading.Event()  # the prober got its first answer
        self.t = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        src = self.c.get_domain(self.name).address or ""
        proc = subprocess.Popen(
            [PY, "-I", "-S", str(Path(__file__).resolve().parent / "prober.py"), src],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
        )  # fmt: skip
        assert proc.stdin is not None and proc.stdout is not None
        reader = threading.Thread(target=self._read, args=(proc.stdout,), daemon=True)
        reader.start()
        try:
            target = None
            while not self.stop.wait(0.002 if target is None else 0.05):
                if target is None and (target := self.target_addr()) is not None:
                    proc.stdin.write(f"target {target}\n")
                    proc.stdin.flush()
            proc.stdin.write("stop\n")
            proc.stdin.flush()
            reader.join(10)
        finally:
            with contextlib.suppress(OSError):
                proc.stdin.close()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def _read(self, out: Any) -> None:
        for line in out:
            kind, _, rest = line.rstrip("\n").partition(" ")
            if kind == "first":
                t, addr = rest.split(" ", 1)
                self.first_ok.setdefault(addr, float(t))
                self.ready.set()
            elif kind == "log":
                self._collect([tuple(x) for x in json.loads(next(out))])
                return

    def _collect(self, log: list[Any]) -> None:
        self.log = log
        for t0, t, addr, code, why in log:
            if code in (200, 404):
                self.first_ok.setdefault(addr, t)
                self.last_ok[addr] = t
                self.answers.append((t, addr))
            else:
                self.slowest_fail_s = max(self.slowest_fail_s, t - t0)
                if t - t0 > 0.05:
                    self.slow_fails.append((t0, addr, t - t0, why))

    def downtime(self, src_addr: str, dst_addr: str) -> float | None:
        last_src, first_dst = switch_edges(self.answers, src_addr, dst_addr)
        return None if last_src is None or first_dst is None else first_dst - last_src


def switch_edges(
    answers: list[tuple[float, str]], src: str, dst: str
) -> tuple[float | None, float | None]:
    """The switch seen by the client, from its answers in time order: (last answer from
    ``src`` before the first from ``dst``, first answer from ``dst``). Nones when there is
    no switch to measure: no answer from a side, or ``dst == src`` (a migration that failed
    back leaves the domain at its source address; "first minus last answer of one address"
    was the negative downtimes, minus the whole run, that the bench once printed)."""
    if not src or not dst or src == dst:
        return None, None
    first_dst = next((t for t, a in answers if a == dst), None)
    if first_dst is None:
        return None, None
    last_src = max((t for t, a in answers if a == src and t <= first_dst), default=None)
    return last_src, first_dst


def switch_probes(p: Prober, src: str, dst: str) -> list[str]:
    """The probes from the source's last answer before the switch to the target's first,
    one line each (start relative to that last answer, side, duration, outcome): where
    the client's downtime went, probe by probe."""
    last_src, first_dst = switch_edges(p.answers, src, dst)
    if last_src is None or first_dst is None:
        return []
    side = {src: "src", dst: "dst"}
    return [
        f"{(t0 - last_src) * 1000:7.1f} ms {side.get(a, a)} {(t1 - t0) * 1000:6.1f} ms "
        f"{code or why}"
        for t0, t1, a, code, why in p.log
        if last_src - 0.005 <= t1 <= first_dst + 0.0001
    ]


def probe(address: str, port: int, timeout_s: float) -> int:
    """Status code of ``GET /kv/probe`` on a fresh connection; 0 when nothing answers."""
    return probe_why(address, port, timeout_s)[0]


@contextlib.contextmanager
def claim_subnets(hosts: list[str]) -> Iterator[dict[str, str]]:
    """A free /24 per host (:func:`~edgevisor.migration.testbed.free_test_subnet`), fenced
    by an ``unreachable`` route in the root namespace while the bench runs: traffic to an
    address of theirs that no domain holds fails at once and never leaves the machine
    (domains' /32 routes are more specific). The route is also the claim: a subnet whose
    route another run added first (``ip route add`` fails) is skipped, so two benches (or
    a bench and the tests) running at once never share a subnet."""
    added: list[str] = []
    taken: set[ipaddress.IPv4Network] = set()
    out: dict[str, str] = {}
    try:
        for h in hosts:
            for _ in range(20):
                net = free_test_subnet(taken)
                taken.add(net)
                r = subprocess.run(["ip", "route", "add", "unreachable", str(net)],
                                   check=False, capture_output=True)  # fmt: skip
                if r.returncode == 0:
                    added.append(str(net))
                    out[h] = str(net)
                    break
            else:
                raise RuntimeError("no free test subnet could be claimed")
        yield out
    finally:
        for net_s in added:
            subprocess.run(["ip", "route", "del", "unreachable", net_s], check=False,
                           capture_output=True)  # fmt: skip


@contextlib.contextmanager
def bench_testbed(
    root: Path, hosts: list[str], args: argparse.Namespace
) -> Iterator[tuple[Testbed, Client]]:
    """A controller and ``hosts`` on this machine, each with a subnet of its own (two
    benches running at once must not hold the same address: the same veth name; the
    prober tells the hosts apart by address), and a client of the account ``bench``.
    ``args`` gives ``cleanup_delay_s`` and ``fill_hold_s``."""
    with (
        claim_subnets(hosts) as subnets,
        open_testbed(root, [], {"network.dataplane_mode": "off"}) as tb,
    ):
        for h, subnet in subnets.items():
            tb.overrides["devices.broker_port"] = free_port()
            tb.overrides["domains.test_subnet"] = subnet
            tb.overrides["domains.quiesce_cleanup_delay_s"] = args.cleanup_delay_s
            if args.fill_hold_s is not None:
                tb.overrides["domains.fill_hold_s"] = args.fill_hold_s
            tb.start_agent(h)
        tb.admin.create_account("bench")
        with Client(tb.ctl.url, tb.admin.create_token("bench").secret) as c:
            yield tb, c


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def sample_reads(
    tb: Testbed, host: str, vid: str, stop: threading.Event
) -> tuple[list[float], list[float]]:
    """4 KiB reads at random offsets on the target's volume while the fill runs."""
    vols = tb.agents[host].agent.capability("volumes")
    dev = vols.device(vid)
    size = dev.size_bytes
    present_lat: list[float] = []
    missing_lat: list[float] = []
    rng = random.Random(7)
    while not stop.is_set():
        off = rng.randrange(0, size // (4 * KiB)) * 4 * KiB
        was_present = all(p for _o, _l, p in dev.present(off, 4 * KiB))
        t0 = time.perf_counter()
        await dev.read(off, 4 * KiB)
        dt = time.perf_counter() - t0
        (present_lat if was_present else missing_lat).append(dt)
        if vols.info(vid).get("lazy") is None or vols.info(vid)["lazy"]["done"]:
            break
        await asyncio.sleep(0.002)
    return present_lat, missing_lat


_BALLAST = """
import os, sys
chunk = os.urandom(4 << 20)
left = int(sys.argv[2])
with open(sys.argv[1], "wb") as f:
    while left > 0:
        left -= f.write(chunk[: min(left, len(chunk))])
    f.flush()
    os.fsync(f.fileno())
"""


def on_ballast(tb: Testbed, host: str, vid: str, code: str, *args: str) -> list[str]:
    """The command running Python ``code`` on the domain's data file (``ballast``, its
    first argument) in the domain's mount namespace on ``host``."""
    att = tb.agents[host].agent.capability("volumes")._get(vid).attached
    cmd = [PY, "-I", "-S", "-c", code, str(Path(att.target) / "ballast"), *args]
    return ["nsenter", f"--mount={att.mount_ns}", "--", *cmd] if att.mount_ns else cmd


def write_ballast(tb: Testbed, host: str, vid: str, nbytes: int) -> None:
    """``nbytes`` of random data in a file on the domain's volume (its filesystem, in the
    domain's mount namespace), fsync'd: the volume's blocks are then data, not holes."""
    if nbytes <= 0:
        return
    subprocess.run(on_ballast(tb, host, vid, _BALLAST, str(nbytes)), check=True, timeout=600)


def one(
    tb: Testbed, c: Client, src: str, dst: str, size: int, mode: str, run: int = 0,
    written: float = 0.0,
) -> dict[str, Any]:
    cmd = [PY, "-I", "-S", "/task/kv.py", "--port", "8080"]
    name = f"b{size >> 20}{'p' if mode == 'post-copy' else 's'}{run or ''}"
    d = c.create_domain(name, cmd, size, app=KV_APP, host=src)
    assert d.address
    wait_serving(d.address)
    # some data on the volume, then a filled page cache does not flatter the source
    for i in range(50):
        http("PUT", f"http://{d.address}:8080/kv/k{i}", os.urandom(512).hex().encode())
    qualified = f"bench.{name}"
    write_ballast(tb, src, f"bench.domain-{name}", int(size * written) & ~(4095))
    src_domain = tb.agents[src].agent.capability("domains").domains[qualified]
    dst_domains = tb.agents[dst].agent.capability("domains").domains

    def target_addr() -> str | None:
        dd = dst_domains.get(qualified)
        return str(dd.address) if dd is not None else None

    prober = Prober(c, name, target_addr)
    prober.t.start()
    prober.ready.wait(30)  # a process of its own: probing before the migration starts
    time.sleep(0.5)
    t_start = time.monotonic()
    m = c.migrate_domain(name, dst, mode=mode)  # type: ignore[arg-type]
    reads: tuple[list[float], list[float]] = ([], [])
    if mode == "post-copy":
        end = time.monotonic() + 300
        while c.get_migration(m.id).phase in ("requested", "preparing", "switching"):
            assert time.monotonic() < end
            time.sleep(0.005)
        # The read sampler runs on the target agent's loop, the one that serves the
        # domain's own reads: started before the service answers, it would slow (and
        # so measure into) the downtime it must not touch. Post-sync goes on for long.
        end = time.monotonic() + 30
        while target_addr() not in prober.first_ok and time.monotonic() < end:
            time.sleep(0.002)
        vid = f"bench.domain-{name}"
        stop = threading.Event()
        try:
            reads = tb.agents[dst].run(sample_reads(tb, dst, vid, stop), 600)
        except Exception as exc:  # the fill may end (promote) while sampling
            log(f"  read sampling ended: {exc}")
    while not (m := c.get_migration(m.id)).settled:
        time.sleep(0.02)
    total = time.monotonic() - t_start
    time.sleep(0.3)
    prober.stop.set()
    prober.t.join(5)
    moved = c.get_domain(name)
    client_down = prober.downtime(d.address, moved.address or "")
    timings = dict(runner_for(tb.ctl.state).timings.get(m.id, []))
    dst_domain = tb.agents[dst].agent.capability("domains").domains.get(qualified)
    preflush = src_domain.timings.get("preflush", {})  # PrepareTarget's last op
    steps = breakdown(
        runner_for(tb.ctl.state).spans.get(m.id, []),
        *switch_edges(prober.answers, d.address, moved.address or ""),
        src_domain.timings.get("quiesce", {}),
        dst_domain.timings.get("start", {}) if dst_domain is not None else {},
    )
    steps.update({f"source preflush before the switch: {k}": v for k, v in preflush.items()})
    held = runner_for(tb.ctl.state).fill_held_s.get(m.id)
    if held is not None:  # StartOnTarget done -> the fill's full rate (after the service)
        steps["fill held at trickle for the service's start"] = held
    with contextlib.suppress(Exception):  # the layers of the target's attach (internals)
        att = tb.agents[dst].agent.capability("volumes")._get(f"bench.domain-{name}").attached
        steps.update({f"target attach: {k}": v for k, v in att.timings.items()})
    c.remove_domain(name)
    return {
        "phase": m.phase,
        "reason": m.reason,
        "client_downtime_s": client_down,
        "runner_downtime_s": m.downtime_s,
        "fill_s": runner_for(tb.ctl.state).fill_s.get(m.id),
        "verify_s": timings.get("Verify"),
        "total_s": total,
        "present_lat": reads[0],
        "missing_lat": reads[1],
        "steps": steps,
        "slowest_failed_probe_s": prober.slowest_fail_s,
        "switch_probes": switch_probes(prober, d.address, moved.address or ""),
    }


def breakdown(
    spans: list[tuple[str, float, float]],
    last_src: float | None,
    first_dst: float | None,
    quiesce: dict[str, float],
    start: dict[str, float],
) -> dict[str, float]:
    """Where the switch went: runner commands on the client's timeline, the domain
    runtime's sub-steps on both sides, and the service's own start-up (StartOnTarget
    done -> first answer on the target)."""
    out: dict[str, float] = {}
    switch = [
        sp
        for sp in spans
        if sp[0] in ("QuiesceSource", "StartOnTarget") or sp[0].startswith("SetRoles(")
    ]
    prev_end = last_src
    for label, t0, t1 in switch:
        if prev_end is not None:
            out[f"gap before {label}"] = t0 - prev_end
        out[label] = t1 - t0
        prev_end = t1
    if prev_end is not None and first_dst is not None:
        out["service up (StartOnTarget done -> first answer)"] = first_dst - prev_end
    out.update({f"source quiesce: {k}": v for k, v in quiesce.items()})
    out.update({f"target start: {k}": v for k, v in start.items()})
    return out


_SLOW_RUN_S = 0.15
"""The issue's target for the post-copy switch downtime."""


def run_figure(r: dict[str, Any]) -> str:
    """One run's client downtime; over the target also the runner's figure and the
    slowest failed probe (a connect that got no answer would show as ~500 ms there)."""
    down = r["client_downtime_s"]
    if down is None or down <= _SLOW_RUN_S:
        return ms(down)
    return (f"{ms(down)} (runner {ms(r['runner_downtime_s'])}, slowest failed probe "
            f"{ms(r['slowest_failed_probe_s'])})")  # fmt: skip


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run whose client downtime is the median (runs without one sort last)."""
    inf = float("inf")
    ranked = sorted(runs, key=lambda r: r["client_downtime_s"] or inf)
    return ranked[(len(ranked) - 1) // 2]


def ms(v: float | None) -> str:
    return "-" if v is None or v != v else f"{v * 1000:.0f} ms"


def main() -> int:
    ap = argparse.ArgumentParser()
    # 4G included: about 3 min for that size (both modes), so `make bench` runs it
    ap.add_argument("--sizes", default="64M,1G,4G")
    ap.add_argument("--big", action="store_true", help="also 4G (when --sizes lacks it)")
    ap.add_argument("--modes", default="post-copy,stop-and-copy")
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="post-copy migrations per size; the run with the median client downtime is "
        "reported (the machine is shared: single runs are noisy)",
    )
    ap.add_argument(
        "--written",
        type=float,
        default=0.75,
        help="fraction of each volume written with random data before migrating (the fill "
        "and stop-and-copy skip holes; 0 migrates a nearly empty filesystem)",
    )
    ap.add_argument(
        "--cleanup-delay-s",
        type=float,
        default=2.0,
        help="domains.quiesce_cleanup_delay_s of the agents: the two simulated hosts share "
        "this machine's CPUs, so the source's volume cleanup would slow the target's start "
        "(on real hosts it runs elsewhere); 0 measures them competing",
    )
    ap.add_argument(
        "--fill-hold-s",
        type=float,
        default=None,
        help="domains.fill_hold_s of the agents (default: the setting's default): the "
        "target holds the fill at its trickle until the domain listens, at most this long; "
        "0 starts the fill at full rate right after the switch",
    )
    ap.add_argument(
        "--probes",
        action="store_true",
        help="log every probe of the switch (source's last answer -> target's first)",
    )
    args = ap.parse_args()
    modes = args.modes.split(",")
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    if args.big and (4 << 30) not in sizes:
        sizes.append(4 << 30)
    if os.geteuid() != 0:
        log("needs root (namespaces, cgroups, FUSE)")
        return 2
    root = Path(tempfile.mkdtemp(prefix="edgevisor-bench-migration-"))
    tag = f"{os.getpid() % 10000}"
    src, dst = f"bench-a{tag}", f"bench-b{tag}"
    rows: list[str] = []
    spread: list[str] = []
    steps_rows: list[str] = []
    try:
        with bench_testbed(root, [src, dst], args) as (tb, c):
            for size in sizes:
                t_size = time.monotonic()
                raw_s = copy_file_range_s(root, size)
                tls = tls_stream_s(root, int(size * args.written) & ~4095)
                res = {}
                for mode in modes:
                    runs = []
                    for i in range(args.repeat if mode == "post-copy" else 1):
                        log(f"{size >> 20} MiB {mode} (run {i + 1}) ...")
                        run_res = one(tb, c, src, dst, size, mode, i, args.written)
                        log(f"  {run_res['phase']}: client downtime "
                            f"{ms(run_res['client_downtime_s'])}")  # fmt: skip
                        if run_res["phase"] != "committed":
                            log(f"    reason: {run_res['reason']}")
                        log(f"    slowest failed probe: "
                            f"{ms(run_res['slowest_failed_probe_s'])}")  # fmt: skip
                        if run_res["fill_s"] is not None:  # every run's, not only the median's
                            log(f"    switch -> synced: {run_res['fill_s']:.3f} s")
                        if args.probes:
                            for line in run_res["switch_probes"]:
                                log(f"      probe {line}")
                        for k, v in run_res["steps"].items():
                            log(f"    {k}: {v * 1000:.1f} ms")
                        runs.append(run_res)
                    res[mode] = median_run(runs)
                    if len(runs) > 1:
                        downs = [ms(x["client_downtime_s"]) for x in runs]
                        log(f"  {size >> 20} MiB {mode}: client downtimes of "
                            f"{len(runs)} runs: {', '.join(downs)}; the median run's "
                            f"figures are reported")  # fmt: skip
                        for k in runs[0]["steps"]:
                            vals = [x["steps"][k] for x in runs if k in x["steps"]]
                            log(f"    median {k}: {pct(vals, 0.5) * 1000:.1f} ms")
                        spread.append(
                            f"{size >> 20} MiB: " + ", ".join(run_figure(x) for x in runs)
                        )
                empty: dict[str, Any] = {
                    "client_downtime_s": None, "runner_downtime_s": None, "fill_s": None,
                    "present_lat": [], "missing_lat": [],
                }  # fmt: skip
                pc, sc = res.get("post-copy", empty), res.get("stop-and-copy", empty)
                fill = pc["fill_s"]
                sync_rate = size / fill / 1e6 if fill else float("nan")
                raw_rate = size / raw_s / 1e6
                pl, ml = pc["present_lat"], pc["missing_lat"]
                rows.append(
                    f"| {size >> 20} MiB | {ms(pc['client_downtime_s'])} "
                    f"({ms(pc['runner_downtime_s'])}) | {ms(sc['client_downtime_s'])} "
                    f"({ms(sc['runner_downtime_s'])}) | "
                    f"{fill or float('nan'):.2f} s ({sync_rate:.0f} MB/s) | "
                    f"{raw_s:.2f} s ({raw_rate:.0f} MB/s) | "
                    f"{tls.seconds:.2f} s ({size / tls.seconds / 1e6:.0f} MB/s; fill at "
                    f"{tls.seconds / fill if fill else float('nan'):.0%}) | "
                    f"{ms(pct(pl, 0.5))} / {ms(pct(pl, 0.99))} (n={len(pl)}) | "
                    f"{ms(pct(ml, 0.5))} / {ms(pct(ml, 0.99))} (n={len(ml)}) |"
                )
                pcd, scd = pc["client_downtime_s"], sc["client_downtime_s"]
                ratio = f"1/{scd / pcd:.0f}" if pcd and scd else "-"
                st: dict[str, float] = pc.get("steps", {})
                steps_rows.append(
                    f"| {size >> 20} MiB | {ratio} | {ms(st.get('QuiesceSource'))} | "
                    f"{ms(st.get('target start: volume'))} / "
                    f"{ms(st.get('StartOnTarget'))} | "
                    f"{ms(st.get('service up (StartOnTarget done -> first answer)'))} | "
                    f"{time.monotonic() - t_size:.0f} s |"
                )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"Each volume had {args.written:.0%} of its size written with random data (a file "
          "in the domain's filesystem) before it migrated; the fill and stop-and-copy skip "
          "what the source holds as holes. switch -> synced: the size over the time from the "
          "switch until every block is present, next to os.copy_file_range of the same size. "
          "TLS stream: the written data (what the fill moves) as one mutual-TLS stream "
          "between two processes into a file, fsync'd (bench/migration/baselines.py): no "
          "fill over the hosts' authenticated link can beat it on this machine; the fill's "
          "time as a share of it in brackets."
          "\n")  # fmt: skip
    print("| volume | post-copy downtime, client (runner) | stop-and-copy downtime, client "
          "(runner) | switch -> synced (fill) | os.copy_file_range | TLS stream of the written "
          "data (ceiling) | read p50/p99 present | read p50/p99 missing |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(r)
    print()
    print("Post-copy switch, where it goes: the source's quiesce (freeze, syncfs, SIGKILL, "
          "unmount), the target's start (of which attaching the lazy volume: FUSE process, "
          "loop, mount), then the service's own start-up until it answers.\n")  # fmt: skip
    print("| volume | post-copy / stop-and-copy downtime | quiesce | target volume attach / "
          "StartOnTarget | service start -> first answer | wall time, both modes |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for r in steps_rows:
        print(r)
    print()
    if spread:
        print(f"Post-copy client downtimes of each run ({args.repeat} per size; the tables "
              f"show the median run; a run over {ms(_SLOW_RUN_S)} shows the runner's figure "
              f"and the client's slowest failed probe, so a slow switch tells a probe that "
              f"got no answer from a slow platform): {'; '.join(spread)}.\n")  # fmt: skip
    print(f"Both simulated hosts share this machine's CPUs; the source's loop/FUSE cleanup "
          f"after quiesce was deferred by {args.cleanup_delay_s:g} s "
          f"(`domains.quiesce_cleanup_delay_s`, default 0) so it does not compete with the "
          f"target's start, as it would not on two real hosts. `--cleanup-delay-s 0` "
          f"measures them competing.")  # fmt: skip
    hold = DomainsSettings().fill_hold_s if args.fill_hold_s is None else args.fill_hold_s
    if hold:
        print(f"\nAfter the switch the target held the fill at its trickle until the domain "
              f"listened, at most {hold:g} s (`domains.fill_hold_s`); switch -> synced "
              f"includes the hold.")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

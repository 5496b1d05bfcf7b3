"""Benchmark: CPU per warm sync call through the coordinator alone (no HTTP, no MQTT).

    .venv/bin/python bench/coordinator/warm_calls.py [--calls 20000] [--callers 16]
        [--profile FILE]

Runs a :class:`~edgevisor.tasks.service.Coordinator` in this process with the host's
default environment factory (isolated as root), deploys an echo task (concurrency 16,
two prewarmed environments), then ``--callers`` coroutines each make sync calls back to
back, the way the devices layer calls a routed task under load. Reports calls/s and the
CPU time of this process (every thread, the journal's included) per call: that figure is
the coordinator's own cost per routed message and does not depend on how busy the machine
is. ``PYTHONPATH=<other checkout>/src`` runs a baseline in the same minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT / "src") not in sys.path:
    sys.path.append(str(ROOT / "src"))  # appended: an explicit PYTHONPATH wins

from edgevisor.tasks.sandbox import default_factory  # noqa: E402
from edgevisor.tasks.service import Coordinator, CoordinatorSettings  # noqa: E402

MANIFEST = (
    'name = "echo"\nruntime = "python"\nhandler = "m:h"\nmemory = "64M"\ncpu = 0.25\n'
    'timeout = "3s"\nconcurrency = 16\n[keep_warm]\nidle = "10m"\nprewarm = 2\n'
)
HANDLER = "def h(event, context):\n    return {'seq': event['payload']['seq']}\n"


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _sys_s() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_stime


async def run(
    calls: int, callers: int, profile: str | None, settings: dict[str, str]
) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "task"
        src.mkdir()
        (src / "edgevisor.toml").write_text(MANIFEST)
        (src / "m.py").write_text(HANDLER)
        factory = default_factory()
        coord = Coordinator(factory, CoordinatorSettings(**settings), Path(tmp) / "data")
        await coord.start()
        try:
            await coord.deploy(src)
            event = {"topic": "devices/bench.dev/req", "source": "bench.dev",
                     "payload": {"seq": 0}}  # fmt: skip
            for _ in range(200):  # warm up: environments started, code paths hot
                await coord.invoke("echo", event)
            per = calls // callers

            async def caller(k: int) -> None:
                for i in range(per):
                    ev = {**event, "payload": {"seq": k * per + i}}
                    rec = await coord.invoke("echo", ev)
                    if rec.status != "succeeded":
                        raise RuntimeError(f"call failed: {rec.error}")

            prof = cProfile.Profile() if profile else None
            c0, s0, t0 = _cpu_s(), _sys_s(), time.perf_counter()
            if prof is not None:
                prof.enable()
            await asyncio.gather(*(caller(k) for k in range(callers)))
            await coord.flush()
            if prof is not None and profile is not None:
                prof.disable()
                prof.dump_stats(profile)
            c1, s1, t1 = _cpu_s(), _sys_s(), time.perf_counter()
            n = per * callers
            return {
                "calls": n,
                "calls_per_s": n / (t1 - t0),
                "cpu_us_per_call": (c1 - c0) / n * 1e6,
                "sys_us_per_call": (s1 - s0) / n * 1e6,
            }
        finally:
            await coord.close()
            if hasattr(factory, "aclose"):
                await factory.aclose()
            else:
                factory.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=20_000, help="Calls in the measured run.")
    ap.add_argument("--callers", type=int, default=16, help="Concurrent calling coroutines.")
    ap.add_argument("--profile", default=None, help="Write a cProfile of the run here.")
    ap.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE",
        help="A CoordinatorSettings field for this run (repeatable).",
    )  # fmt: skip
    args = ap.parse_args()
    settings = dict(kv.split("=", 1) for kv in args.set)
    r = asyncio.run(run(args.calls, args.callers, args.profile, settings))
    print("| calls | callers | calls/s | CPU µs/call (this process, all threads) | of it kernel |")
    print("|---|---|---|---|---|")
    print(f"| {r['calls']:.0f} | {args.callers} | {r['calls_per_s']:.0f} "
          f"| {r['cpu_us_per_call']:.0f} | {r['sys_us_per_call']:.0f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

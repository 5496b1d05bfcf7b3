"""Benchmark: the scheduler's decision cost and the coordinator's no-op call throughput.

    .venv/bin/python bench/coordinator/scheduler.py [--quick]

1. ns per decision with 100 and with 10,000 calls queued over 20 task versions, with a
   big call at the front that does not fit (every decision passes it). Each cycle is
   enqueue one call, decide (one slot free), complete it, so the queue length stays put.
   Baseline in the same run: one heappush+heappop on a heap of the same size.
2. Throughput and latency of no-op calls through the whole Coordinator with an
   IN-PROCESS environment (a python function called directly: no sandbox, no process
   boundary), so this measures coordinator overhead only. 8 concurrent callers, and one
   caller for warm-call latency. Baseline: the same environment invoked directly.

Prints markdown tables.
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from edgevisor.tasks.environment import EnvSpec, Outcome, SubcallFn
from edgevisor.tasks.scheduler import Demand, Resources, Scheduler
from edgevisor.tasks.service import Coordinator, CoordinatorSettings

# -- 1. decision cost -------------------------------------------------------------------


def _decision_ns(queued: int, cycles: int) -> tuple[float, float]:
    cap = Resources(16_000, 16_000, 64)
    s = Scheduler(cap, aging_s=1e9, queue_bound=queued * 2 + 10)
    keys = [f"t{i}" for i in range(20)]
    for i, k in enumerate(keys):
        s.set_task(k, Demand(64 + 16 * i, 100), 1_000_000)
    s.set_task("big", Demand(8_000, 1000), 1)
    s.enqueue("big-0", "big", 5, 0.0)  # highest priority, never fits: passed every time
    n = 0
    for _ in range(queued - 1):
        n += 1
        s.enqueue(f"c{n}", keys[n % 20], n % 3, 0.0)
    free = Resources(4_000, 16_000, 1)  # one slot: one dispatch per decision
    decide_ns = 0
    t_all = time.perf_counter_ns()
    for i in range(cycles):
        n += 1
        s.enqueue(f"c{n}", keys[n % 20], n % 3, float(i))
        t0 = time.perf_counter_ns()
        out = s.decide(free, float(i))
        decide_ns += time.perf_counter_ns() - t0
        assert len(out) == 1
        s.complete(out[0].task)
    total = time.perf_counter_ns() - t_all
    assert s.pending_count == queued
    return decide_ns / cycles, total / cycles


def _heap_ns(size: int, cycles: int) -> float:
    h = [(i, i) for i in range(size)]
    heapq.heapify(h)
    t0 = time.perf_counter_ns()
    for i in range(cycles):
        heapq.heappush(h, (size + i, i))
        heapq.heappop(h)
    return (time.perf_counter_ns() - t0) / cycles


# -- 2. through the coordinator ---------------------------------------------------------


class InProcEnv:
    """No-op environment: the handler is a python function called in-process."""

    def __init__(self, spec: EnvSpec) -> None:
        self.spec = spec

    @property
    def healthy(self) -> bool:
        return True

    async def start(self) -> float:
        return 0.0

    async def invoke(
        self, event: Any, context: dict[str, Any], subcall: SubcallFn | None = None
    ) -> Outcome:
        return Outcome("ok", result=event)

    async def close(self) -> None:
        return None


class InProcFactory:
    isolated = False

    def create(self, spec: EnvSpec) -> InProcEnv:
        return InProcEnv(spec)


def _factory(kind: str) -> Any:
    if kind == "inproc":
        return InProcFactory()
    from edgevisor.tasks import sandbox

    return sandbox.IsolatedFactory() if kind == "isolated" else sandbox.PlainFactory()


async def _through_service(calls: int, callers: int, kind: str = "inproc") -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "noop"
        bundle.mkdir()
        (bundle / "edgevisor.toml").write_text(
            'name = "noop"\nruntime = "python"\nhandler = "main:handler"\n'
            'memory = "64M"\ncpu = 0.1\nconcurrency = 16\n'
        )
        (bundle / "main.py").write_text("def handler(e, c):\n    return e\n")
        settings = CoordinatorSettings(memory_mb=4096, cpu=4.0, max_envs=32)
        factory = _factory(kind)
        coord = Coordinator(factory, settings, Path(tmp) / "data")
        await coord.start()
        try:
            await coord.deploy(bundle)
            for _ in range(200):  # warm up: environments, code paths
                await coord.invoke("noop", {})
            # single caller latency
            lat: list[float] = []
            for _ in range(min(calls, 5000)):
                t0 = time.perf_counter()
                r = await coord.invoke("noop", {})
                lat.append(time.perf_counter() - t0)
                assert r.status == "succeeded"
            lat.sort()
            # 8 concurrent callers
            per = calls // callers

            async def caller() -> None:
                for _ in range(per):
                    await coord.invoke("noop", {})

            t0 = time.perf_counter()
            await asyncio.gather(*(caller() for _ in range(callers)))
            elapsed = time.perf_counter() - t0
            # async calls: journaled (group commit) before the id is returned
            t1 = time.perf_counter()
            ids = await asyncio.gather(
                *(coord.invoke("noop", {}, async_=True) for _ in range(min(calls, 2000)))
            )
            accept = time.perf_counter() - t1
            for i in ids:
                await coord.wait_call(i, 60)
            async_elapsed = time.perf_counter() - t1
            await coord.flush()
        finally:
            await coord.close()
            if hasattr(factory, "close"):
                factory.close()
    # baseline: the same environment called directly
    env = InProcEnv(EnvSpec("noop", "x", Path("."), "python", "m:f", 64, 0.1, 3.0))
    t0 = time.perf_counter()
    for _ in range(calls):
        await env.invoke({}, {"call_id": "x"})
    direct = (time.perf_counter() - t0) / calls
    return {
        "p50_us": statistics.median(lat) * 1e6,
        "p99_us": lat[int(len(lat) * 0.99) - 1] * 1e6,
        "throughput": per * callers / elapsed,
        "direct_us": direct * 1e6,
        "async_accept_per_s": len(ids) / accept,
        "async_total_per_s": len(ids) / async_elapsed,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer iterations")
    ap.add_argument(
        "--env",
        choices=["inproc", "plain", "isolated"],
        default=["inproc"],
        nargs="+",
        help="environments for part 2 (plain/isolated: the real sandbox, tasks.sandbox)",
    )
    args = ap.parse_args()
    cycles = 20_000 if args.quick else 100_000
    calls = 4_000 if args.quick else 40_000

    print("## Scheduler decision cost (pure, no I/O)\n")
    print("| queued calls | ns / decision | ns / enqueue+decide+complete | heap push+pop ns |")
    print("|---:|---:|---:|---:|")
    for queued in (100, 10_000):
        d, cyc = _decision_ns(queued, cycles)
        base = _heap_ns(queued, cycles)
        print(f"| {queued:,} | {d:,.0f} | {cyc:,.0f} | {base:,.0f} |")

    labels = {
        "inproc": "IN-PROCESS environment (no sandbox: coordinator overhead only)",
        "plain": "real PLAIN environment (subprocess runtime, rlimits)",
        "isolated": "real ISOLATED environment (bubblewrap + cgroups)",
    }
    for kind in args.env:
        n = calls if kind == "inproc" else max(2_000, calls // 10)
        r = asyncio.run(_through_service(n, 8, kind))
        print(f"\n## No-op calls through the Coordinator — {labels[kind]}\n")
        print("| measure | value |")
        print("|---|---:|")
        print(f"| sync calls/s, 8 concurrent callers | {r['throughput']:,.0f} |")
        print(f"| warm call p50, 1 caller | {r['p50_us']:,.0f} µs |")
        print(f"| warm call p99, 1 caller | {r['p99_us']:,.0f} µs |")
        if kind == "inproc":
            print(f"| baseline: env.invoke called directly | {r['direct_us']:,.1f} µs |")
        acc = r["async_accept_per_s"]
        print(f"| async calls accepted/s (journaled before ack, 2,000 at once) | {acc:,.0f} |")
        print(f"| async calls accepted + completed/s | {r['async_total_per_s']:,.0f} |")
    print(f"\npython {sys.version.split()[0]}; cycles={cycles}, calls={calls}")


if __name__ == "__main__":
    main()

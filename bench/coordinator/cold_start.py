"""Cold start and warm invoke of execution environments, against baselines from the same run.

    .venv/bin/python bench/coordinator/cold_start.py [--runs 30] [--calls 2000]

Rows (p50 / p99, and the ratio of p50 to the row's baseline):

* cold start of an isolated environment (bwrap + cgroups + runtime + no-op handler loaded)
  vs ``python -c pass`` started from the real interpreter binary;
* the same for a plain environment (no root needed);
* start of an environment from a prewarmed sandbox ("stem": namespaces, cgroups and the
  runtime already up; the bundle is hard-linked in, limits written, the handler loaded)
  vs ``python -I -S -c pass``;
* warm invoke round trip through ``Environment.invoke`` (asyncio, framed protocol, a no-op
  handler in the sandbox) vs a raw ``multiprocessing.Pipe`` echo round trip (the floor).

Isolated rows need root, bubblewrap and cgroup v1; without them they are skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path

from edgevisor.tasks.environment import EnvironmentFactory, EnvSpec
from edgevisor.tasks.runtime import interpreter
from edgevisor.tasks.sandbox import IsolatedFactory, PlainFactory, isolation_available


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


def fmt(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.0f} µs"


def python_pass(runs: int, *flags: str) -> list[float]:
    exe = interpreter()
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run([exe, *flags, "-c", "pass"], check=True)
        out.append(time.perf_counter() - t)
    return out


def _echo(conn: Connection) -> None:
    while True:
        msg = conn.recv()
        if msg is None:
            return
        conn.send(msg)


def pipe_echo(calls: int) -> list[float]:
    parent, child = multiprocessing.Pipe()
    proc = multiprocessing.get_context("fork").Process(target=_echo, args=(child,))
    proc.start()
    out = []
    try:
        for i in range(calls + 100):
            t = time.perf_counter()
            parent.send({"i": i})
            parent.recv()
            if i >= 100:
                out.append(time.perf_counter() - t)
    finally:
        parent.send(None)
        proc.join(5)
    return out


def make_spec(bundle: Path) -> EnvSpec:
    return EnvSpec(
        task="bench-noop", version="v1", bundle_dir=bundle, runtime="python",
        handler="noop:handler", memory_mb=128, cpu=1.0, timeout_s=30.0,
    )


async def cold(factory: EnvironmentFactory, spec: EnvSpec, runs: int) -> tuple[list[float], ...]:
    starts, firsts = [], []
    for _ in range(runs):
        env = factory.create(spec)
        t = time.perf_counter()
        try:
            await env.start()
            starts.append(time.perf_counter() - t)
            out = await env.invoke(None, {})
            firsts.append(time.perf_counter() - t)
            assert out.status == "ok", out.error
        finally:
            await env.close()
    return starts, firsts


async def prewarmed(factory: IsolatedFactory, spec: EnvSpec, runs: int) -> list[float]:
    """start() of an environment that takes over a prewarmed sandbox (refilled between)."""
    await factory.prewarm(1, spec.network, spec.tmp_mb)
    out = []
    for _ in range(runs):
        while factory.pool.size(spec.network, spec.tmp_mb) < 1:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # let the refill's process settle before timing
        env = factory.create(spec)
        t = time.perf_counter()
        try:
            await env.start()
            out.append(time.perf_counter() - t)
            assert getattr(env, "from_stem", False)
        finally:
            await env.close()
    return out


async def warm(factory: EnvironmentFactory, spec: EnvSpec, calls: int) -> list[float]:
    env = factory.create(spec)
    out = []
    try:
        await env.start()
        for i in range(calls + 100):
            t = time.perf_counter()
            res = await env.invoke({"i": i}, {})
            if i >= 100:
                out.append(time.perf_counter() - t)
            assert res.status == "ok", res.error
    finally:
        await env.close()
    return out


def row(name: str, xs: list[float], base: list[float] | None, base_name: str) -> str:
    ratio = f"{statistics.median(xs) / statistics.median(base):.2f}x" if base else "-"
    return f"| {name} | {fmt(pct(xs, 50))} | {fmt(pct(xs, 99))} | {base_name} | {ratio} |"


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--calls", type=int, default=2000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="ev-bench-") as tmp:
        bundle = Path(tmp) / "bundle"
        bundle.mkdir()
        (bundle / "noop.py").write_text("def handler(event, context):\n    return event\n")
        os.chmod(tmp, 0o755)
        spec = make_spec(bundle)
        py = python_pass(args.runs)
        py_is = python_pass(args.runs, "-I", "-S")
        echo = pipe_echo(args.calls)
        rows = [
            row("`python -c pass`", py, None, "-"),
            row("`python -I -S -c pass`", py_is, py, "`python -c pass`"),
            row("raw multiprocessing.Pipe echo round trip", echo, None, "-"),
        ]
        kinds: list[tuple[str, EnvironmentFactory]] = []
        plain = PlainFactory()
        kinds.append(("plain", plain))
        iso = IsolatedFactory() if isolation_available() else None
        if iso is not None:
            kinds.append(("isolated", iso))
        try:
            for kind, factory in kinds:
                starts, firsts = await cold(factory, spec, args.runs)
                rows.append(row(f"cold start, {kind} (start → Ready)", starts, py,
                                "`python -c pass`"))
                rows.append(row(f"cold start, {kind} (start → Ready)", starts, py_is,
                                "`python -I -S -c pass`"))
                rows.append(row(f"cold start + first call, {kind}", firsts, py,
                                "`python -c pass`"))
                lat = await warm(factory, spec, args.calls)
                rows.append(row(f"warm invoke round trip, {kind}", lat, echo, "Pipe echo"))
            if iso is not None:
                pre = await prewarmed(iso, spec, args.runs)
                rows.append(row("cold start from a prewarmed sandbox, isolated", pre, py_is,
                                "`python -I -S -c pass`"))
        finally:
            plain.close()
            if iso is not None:
                await iso.aclose()
    print(f"cold runs: {args.runs}, warm calls: {args.calls}, cpus: {os.cpu_count()}, "
          f"load: {os.getloadavg()[0]:.2f}, python: {sys.version.split()[0]}")
    if iso is None:
        print("isolated rows skipped: not root, or bwrap/cgroup v1 missing")
    print()
    print("| measurement | p50 | p99 | baseline | ratio (p50) |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    asyncio.run(main())

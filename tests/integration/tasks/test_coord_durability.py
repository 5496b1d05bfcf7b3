"""kill -9 durability: 500 async calls acked by one coordinator process, the process is
killed with SIGKILL, a new coordinator on the same data dir completes every call; calls
finished before the kill do not run again, and keyed calls resubmitted map to the same
call and run once."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from coord_fakeenv import FakeFactory, make_bundle

from edgevisor.tasks.service import Coordinator, CoordinatorSettings

pytestmark = pytest.mark.timeout(120)

N = 500
FINISHED_BEFORE_KILL = 100
HERE = Path(__file__).resolve().parent

CHILD = textwrap.dedent(
    """
    import asyncio, json, sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    from coord_fakeenv import FakeFactory
    from edgevisor.tasks.service import Coordinator, CoordinatorSettings

    data, bundle, log_path = Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
    N, FINISH = int(sys.argv[5]), int(sys.argv[6])

    async def main() -> None:
        log = open(log_path, "a")
        started = 0
        never = asyncio.Event()

        async def work(event, ctx):
            nonlocal started
            n = started
            started += 1
            if n >= FINISH:
                await never.wait()  # running, unfinished when the kill comes
            log.write(ctx.call_id + "\\n")
            log.flush()
            return event["i"]

        coord = Coordinator(
            FakeFactory({"work": work}), CoordinatorSettings(max_envs=4), data
        )
        await coord.start()
        await coord.deploy(bundle)
        ids = await asyncio.gather(*(
            coord.invoke("work", {"i": i}, async_=True,
                         idempotency_key=f"key-{i}" if i % 3 == 0 else None)
            for i in range(N)
        ))
        print("ACKED " + json.dumps(ids), flush=True)
        while coord.stats()["in_flight"] > N - FINISH:
            await asyncio.sleep(0.01)
        await coord.flush()
        print("READY", flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())
    """
)


STREAM_CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    from coord_fakeenv import FakeFactory
    from edgevisor.tasks.service import Coordinator, CoordinatorSettings

    data, bundle = Path(sys.argv[2]), Path(sys.argv[3])

    async def main() -> None:
        async def work(event, ctx):
            await asyncio.sleep(0.002)
            return event["i"]

        coord = Coordinator(FakeFactory({"work": work}), CoordinatorSettings(max_envs=4), data)
        await coord.start()
        await coord.deploy(bundle)

        async def submitter(w: int) -> None:
            for j in range(10_000):
                i = w * 10_000 + j
                cid = await coord.invoke("work", {"i": i}, async_=True)
                print(f"ACK {cid} {i}", flush=True)

        await asyncio.gather(*(submitter(w) for w in range(8)))

    asyncio.run(main())
    """
)


def _read_line(proc: subprocess.Popen[str], prefix: str, timeout_s: float = 90.0) -> str:
    import selectors

    sel = selectors.DefaultSelector()
    assert proc.stdout is not None
    sel.register(proc.stdout, selectors.EVENT_READ)
    while True:
        if not sel.select(timeout_s):
            raise AssertionError(f"no {prefix!r} line from the coordinator process")
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"coordinator process ended early: {proc.wait()}")
        if line.startswith(prefix):
            return line[len(prefix) :].strip()


async def test_kill_9_with_500_async_calls_accepted(tmp_path: Path) -> None:
    data = tmp_path / "data"
    bundle = make_bundle(tmp_path, "work")
    log_path = tmp_path / "executions.log"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(HERE), str(data), str(bundle), str(log_path),
         str(N), str(FINISHED_BEFORE_KILL)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ},
    )  # fmt: skip
    try:
        ids: list[str] = json.loads(_read_line(proc, "ACKED "))
        _read_line(proc, "READY")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        assert proc.stdout is not None
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    assert len(ids) == N == len(set(ids))
    before = log_path.read_text().split()
    assert len(before) == FINISHED_BEFORE_KILL

    runs: list[str] = []

    async def work(event: Any, ctx: Any) -> Any:
        runs.append(ctx.call_id)
        return event["i"]

    coord = Coordinator(FakeFactory({"work": work}), CoordinatorSettings(max_envs=4), data)
    await coord.start()
    try:
        recs = await asyncio.gather(*(coord.wait_call(i, 60) for i in ids))
        assert all(r.status == "succeeded" for r in recs)
        assert [r.result for r in recs] == list(range(N))
        # keyed calls resubmitted after the restart: the same call, not run again
        again = [
            await coord.invoke("work", {"i": i}, async_=True, idempotency_key=f"key-{i}")
            for i in range(0, N, 3)
        ]
        assert again == [ids[i] for i in range(0, N, 3)]
        await asyncio.sleep(0.1)
    finally:
        await coord.close()
    executions = before + runs
    assert sorted(executions) == sorted(ids)  # every call ran, and exactly once


async def test_kill_9_mid_stream_loses_no_acked_call(tmp_path: Path) -> None:
    """SIGKILL while 8 submitters are still being acked: every call whose id was returned
    before the kill exists after the restart and completes."""
    data = tmp_path / "data"
    bundle = make_bundle(tmp_path, "work")
    script = tmp_path / "stream.py"
    script.write_text(STREAM_CHILD)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(HERE), str(data), str(bundle)],
        stdout=subprocess.PIPE,
        text=True,
    )
    acked: dict[str, int] = {}
    try:
        while len(acked) < N:
            cid, num = _read_line(proc, "ACK ").split()
            acked[cid] = int(num)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        assert proc.stdout is not None
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL

    async def work(event: Any, ctx: Any) -> Any:
        return event["i"]

    coord = Coordinator(FakeFactory({"work": work}), CoordinatorSettings(max_envs=4), data)
    await coord.start()
    try:
        for cid, i in acked.items():
            rec = await coord.wait_call(cid, 60)
            assert rec.status == "succeeded" and rec.result == i
    finally:
        await coord.close()

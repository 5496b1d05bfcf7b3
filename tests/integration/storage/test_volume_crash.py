"""Crash safety: kill -9 a writer mid-stream; every block marked present has its data."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

from edgevisor.storage.volume import Volume

BS = 4096
NBLOCKS = 256

WRITER = r"""
import asyncio, random, struct, sys
from edgevisor.storage.volume import Volume

async def main():
    v = Volume.open(sys.argv[1])
    await v.set_mark()
    rnd = random.Random(int(sys.argv[2]))
    gen = 0
    while True:
        batch = []
        for _ in range(rnd.randint(1, 8)):
            gen += 1
            b = rnd.randrange(NBLOCKS)
            await v.write(b * BS, struct.pack(">QQ", b, gen) * (BS // 16))
            batch.append((b, gen))
        await v.flush()
        for b, g in batch:
            sys.stdout.write(f"{b} {g}\n")
        sys.stdout.flush()

asyncio.run(main())
""".replace("NBLOCKS", str(NBLOCKS)).replace("BS", str(BS))


def test_kill9_writer_leaves_consistent_state(tmp_path: Path) -> None:
    path = tmp_path / "crash"
    Volume.create(path, NBLOCKS * BS, BS, present=False).close()
    for round_ in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), str(round_)],
            stdout=subprocess.PIPE,
            text=True,
        )
        acked: dict[int, int] = {}
        try:
            assert proc.stdout is not None
            deadline = time.monotonic() + 60
            while len(acked) < 40 and time.monotonic() < deadline:
                line = proc.stdout.readline()
                if not line:
                    break
                b, g = map(int, line.split())
                acked[b] = g
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        assert len(acked) >= 40, "writer made no progress"

        v = Volume.open(path)
        try:
            assert v.corrupt_reason is None
            missing = set(v.missing_blocks())
            assert not missing & set(acked), "an acknowledged block is not present"
            written = set(v.written_since_mark())
            assert set(acked) <= written, "a written block is missing from the intent log"
            raw = v.data_path.read_bytes()
            for b in range(NBLOCKS):
                if b in missing:
                    continue
                blk = raw[b * BS : (b + 1) * BS]
                unit = blk[:16]
                assert blk == unit * (BS // 16), f"block {b} present but torn/empty"
                bb, g = struct.unpack(">QQ", unit)
                assert bb == b
                assert g >= acked.get(b, 0)
                assert b in written or round_ > 0
        finally:
            v.close()

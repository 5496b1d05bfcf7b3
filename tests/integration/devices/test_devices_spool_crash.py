"""The spool survives kill -9: every append that returned is there, in order, after restart."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from edgevisor.devices.spool import Spool

WRITER = textwrap.dedent(
    """
    import sys
    from edgevisor.devices.spool import Spool
    sp = Spool(sys.argv[1], max_items=1_000_000)
    i = 0
    while True:
        sp.put("message", {"i": i})
        print(i, flush=True)  # printed only after the append returned
        i += 1
    """
)


def test_devices_spool_survives_kill_9(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True
    )
    last = -1
    try:
        assert proc.stdout is not None
        while last < 200:
            line = proc.stdout.readline()
            assert line, "writer died"
            last = int(line)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    sp = Spool(path, max_items=1_000_000)
    items = sp.peek(1_000_000)
    got = [it.body["i"] for it in items]
    # Everything acknowledged is there, in order, with no gaps; at most a few appends that
    # completed after the last line we read are there too.
    assert got[: last + 1] == list(range(last + 1))
    assert got == list(range(len(got)))
    assert len(sp) == len(got)
    # The spool is usable after the crash.
    assert sp.put("message", {"i": "after"})
    assert sp.peek(len(got) + 1)[-1].body == {"i": "after"}

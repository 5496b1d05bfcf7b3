"""The switch's staged target and hot-set prefetch never serve data older than the
source's last write (as root, a controller and two in-process agents).

The target is prepared (domain staged, lazy volume held with its FUSE process and loop
device up) and the source names its hot set; then the source keeps writing, overwriting
exactly the blocks the hot set names. Nothing may have been fetched before the release;
after the switch the target serves every last value.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgevisor import Client
from edgevisor.migration.testbed import Testbed, http, open_testbed, wait_serving
from edgevisor.storage.hostfs import read_mountinfo

pytestmark = [pytest.mark.root, pytest.mark.timeout(240)]

KV_APP = Path(__file__).resolve().parents[3] / "examples" / "domains" / "kv"
PY = os.path.realpath(sys.executable)
KV_CMD = [PY, "-I", "-S", "/task/kv.py", "--port", "8080"]
TAG = f"{os.getpid() % 100000}"
SRC, DST = f"fa{TAG}", f"fb{TAG}"


@pytest.fixture
def bed(tmp_path: Path) -> Iterator[tuple[Testbed, Client]]:
    with open_testbed(tmp_path, [SRC, DST]) as tb:
        tb.admin.create_account("acme")
        with Client(tb.ctl.url, tb.admin.create_token("acme").secret) as acme:
            yield tb, acme
    left = [m.mount_point for m in read_mountinfo() if str(tmp_path) in m.mount_point]
    assert left == [], left


def _put(addr: str, key: str, value: str) -> None:
    code, _ = http("PUT", f"http://{addr}:8080/kv/{key}", value.encode(), timeout_s=10)
    assert code == 204


def test_writes_after_prepare_and_hot_set_reach_the_target(
    bed: tuple[Testbed, Client],
) -> None:
    tb, acme = bed
    d = acme.create_domain("fresh", KV_CMD, 64 << 20, app=KV_APP, host=SRC)
    assert d.address
    wait_serving(d.address)
    for i in range(40):
        _put(d.address, f"k{i}", f"old{i}-" + "x" * 900)
    src, dst = tb.agents[SRC], tb.agents[DST]
    msrc, mdst = src.agent.capability("migration"), dst.agent.capability("migration")
    who: dict[str, Any] = {"account": "acme", "name": "fresh"}
    offer = src.run(msrc.op_offer({**who, "peer": DST}))
    dst.run(mdst.op_prepare({**offer, "lazy": True, "rate_bytes_s": None}))
    hot = src.run(msrc.op_preflush(who))["hot"]
    assert len(hot) == 2, hot  # the mount's metadata, then the kv log the service holds
    # the source keeps writing after prepare and after naming its hot set: the same keys
    # (the log grows into the hot set's room) and new ones
    want = {f"k{i}": f"new{i}-" + "y" * 900 for i in range(60)}
    for k, v in want.items():
        _put(d.address, k, v)
    vid = offer["source"]["export"]
    vols = dst.agent.capability("volumes")
    lazy = vols.info(vid)["lazy"]
    assert lazy is not None and lazy["bytes_present"] == 0  # held: nothing fetched yet
    try:
        src.run(msrc.op_quiesce(who))
        dst.run(mdst.op_set_role({**who, "role": "primary"}))
        src.run(msrc.op_set_role({**who, "role": "secondary"}))
        out = dst.run(mdst.op_start({**who, "prefetch": hot}))
        addr = str(out["address"])
        wait_serving(addr)
        code, body = http("GET", f"http://{addr}:8080/kv", timeout_s=10)
        assert code == 200
        assert json.loads(body) == want
        # the prefetch did fetch (the hot set was used), the rest is the fill's
        assert vols.info(vid)["lazy"]["bytes_present"] > 0
    finally:
        dst.run(mdst.op_discard(who))
        src.run(msrc.op_resume(who))
    wait_serving(d.address)
    code, body = http("GET", f"http://{d.address}:8080/kv/k59", timeout_s=10)
    assert (code, body.decode()) == (200, want["k59"])
    acme.remove_domain("fresh")


def test_the_runner_hands_the_sources_hot_set_to_the_targets_start(
    bed: tuple[Testbed, Client],
) -> None:
    tb, acme = bed
    d = acme.create_domain("hand", KV_CMD, 64 << 20, app=KV_APP, host=SRC)
    assert d.address
    wait_serving(d.address)
    for i in range(20):
        _put(d.address, f"k{i}", f"v{i}")
    router = tb.agents[DST].agent.router
    seen: list[Any] = []
    start = router._ops["migration.start"]

    async def spy(p: dict[str, Any]) -> Any:
        seen.append(p.get("prefetch"))
        return await start(p)

    router._ops["migration.start"] = spy
    m = acme.migrate_domain("hand", DST)
    end = time.monotonic() + 120
    while not (m := acme.get_migration(m.id)).settled:
        assert time.monotonic() < end
        time.sleep(0.05)
    assert m.phase == "committed", m.reason
    assert len(seen) == 1
    groups = seen[0]
    # the mount's metadata (the first 64 KiB among it), then the kv log's blocks
    assert len(groups) == 2 and groups[0][0] == [0, 65536], groups
    moved = acme.get_domain("hand")
    assert moved.address
    code, body = http("GET", f"http://{moved.address}:8080/kv", timeout_s=10)
    assert code == 200 and json.loads(body) == {f"k{i}": f"v{i}" for i in range(20)}
    acme.remove_domain("hand")

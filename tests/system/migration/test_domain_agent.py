"""The domains capability across an agent crash: stale objects cleared, domains back up."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import urllib.request
from pathlib import Path

import pytest

from edgevisor.agent.daemon import Agent
from edgevisor.agent.domains import DomainsCapability
from edgevisor.errors import AlreadyExists, NotFound
from edgevisor.migration.domain_parts import cgroup_parent
from edgevisor.network.netns import netns_exists
from edgevisor.sdk.tasks import pack_bundle
from edgevisor.settings import load_settings
from edgevisor.storage.hostfs import read_mountinfo

pytestmark = [pytest.mark.root, pytest.mark.timeout(240)]

KV_APP = Path(__file__).resolve().parents[3] / "examples" / "domains" / "kv"
PY = os.path.realpath(sys.executable)


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=3) as resp:
        return bytes(resp.read())


def _put(url: str, body: bytes) -> int:
    req = urllib.request.Request(url, data=body, method="PUT")
    with urllib.request.urlopen(req, timeout=5) as resp:
        return int(resp.status)


async def _serving(address: str) -> None:
    for _ in range(600):
        try:
            await asyncio.to_thread(_get, f"http://{address}:8080/healthz")
            return
        except OSError:
            await asyncio.sleep(0.1)
    raise AssertionError("kv never served")


async def test_agent_crash_then_restart_clears_stale_and_restarts() -> None:
    root = Path(tempfile.mkdtemp(prefix=f"evtest-domagent-{os.getpid()}-", dir="/tmp"))
    settings = load_settings(
        overrides={"data_dir": str(root), "agent.host_name": f"crash{os.getpid()}"}, environ={}
    )
    caps: list[DomainsCapability] = []
    try:
        agent = Agent(settings)
        cap = DomainsCapability(settings)
        caps.append(cap)
        await cap.start(agent)
        payload = {
            "account": "acme", "name": "kv", "volume_size_bytes": 32 << 20,
            "command": [PY, "-I", "-S", "/task/kv.py", "--port", "8080"],
            "app_b64": base64.b64encode(pack_bundle(KV_APP)).decode(),
        }  # fmt: skip
        info = await agent.router.dispatch("domains.create", payload)
        assert info["phase"] == "running" and info["volume"] == "domain-kv"
        with pytest.raises(AlreadyExists):
            await agent.router.dispatch("domains.create", payload)
        address = info["address"]
        await _serving(address)
        assert await asyncio.to_thread(_put, f"http://{address}:8080/kv/x", b"42") == 204

        # the agent "dies": its loop stops supervising, the parent-death signal kills the
        # sandbox; the namespace, cgroups and the volume's mounts stay behind
        d = cap.get("acme", "kv")
        old_netns = d.netns
        assert d._supervisor is not None and d.pid is not None
        d._supervisor.cancel()
        os.kill(d.pid, signal.SIGKILL)
        await asyncio.to_thread(d._proc.wait)  # type: ignore[union-attr]
        d._proc = None
        assert netns_exists(old_netns)
        await agent._client.aclose()

        agent2 = Agent(settings)
        cap2 = DomainsCapability(settings)
        caps.append(cap2)
        await cap2.start(agent2)  # clears the stale objects, then starts kv again
        d2 = cap2.get("acme", "kv")
        assert d2.phase == "running" and d2.netns == old_netns and str(d2.address) == address
        await _serving(address)
        assert await asyncio.to_thread(_get, f"http://{address}:8080/kv/x") == b"42"
        listed = await agent2.router.dispatch("domains.list", {"account": "acme"})
        assert [x["name"] for x in listed] == ["kv"]
        assert await agent2.router.dispatch("domains.list", {"account": "other"}) == []

        await agent2.router.dispatch("domains.remove", {"account": "acme", "name": "kv"})
        with pytest.raises(NotFound):
            await agent2.router.dispatch("domains.info", {"account": "acme", "name": "kv"})
        assert not netns_exists(old_netns)
        assert [m for m in read_mountinfo() if m.mount_point.startswith(str(root))] == []
        assert not (
            root / "agent" / settings.agent.host_name / "domain-volumes" / "acme.domain-kv"
        ).exists()
        await cap2.stop()
        assert not (Path("/sys/fs/cgroup/freezer") / cgroup_parent(cap2._key)).exists()
        await agent2._client.aclose()
    finally:
        for c in reversed(caps):
            for dom in list(c.domains.values()):
                with contextlib.suppress(Exception):
                    await dom.stop()
        shutil.rmtree(root, ignore_errors=True)

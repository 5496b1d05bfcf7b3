"""A lazy ext4 volume mounted on a "target" whose source is another process (issue 5).

The source is a separate process serving a volume over NBD with TLS, openable by host
``target`` only. The target's volumes capability creates a lazy volume from it, mounts it
(FUSE -> loop -> ext4), checks file contents before the fill ends, rides out a kill -9 of
the source mid-fill (a read of a missing file waits and completes once the source is
back), and ends with images identical to the byte.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from edgevisor.agent.rpc import OpRouter
from edgevisor.agent.volumes import VolumesCapability
from edgevisor.errors import PeerUnavailable
from edgevisor.pki import FleetCA, HostIdentity
from edgevisor.settings import load_settings
from edgevisor.storage.hostfs import read_mountinfo
from edgevisor.storage.nbd_client import NBDClient
from edgevisor.storage.volume import Volume
from edgevisor.testing.controller import free_port

pytestmark = pytest.mark.root

MiB = 1 << 20
SIZE = 64 * MiB
SOURCE_SCRIPT = Path(__file__).with_name("volumes_wired_source.py")


@dataclass
class FakeAgent:
    host: str
    dir: Path
    router: OpRouter = field(default_factory=OpRouter)
    cfg: Any = field(default_factory=lambda: SimpleNamespace(controller_url="http://127.0.0.1:9"))


def _identity(ca: FleetCA, d: Path, host: str) -> HostIdentity:
    ident = HostIdentity(d, host)
    ident.store(ca.sign_host(host, ident.csr_pem()), ca.cert_pem)
    return ident


@dataclass
class SourceProc:
    vol_dir: Path
    port: int
    pki: Path
    proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(SOURCE_SCRIPT), str(self.vol_dir), str(self.port),
             str(self.pki), "source", "target"],
            stdout=subprocess.PIPE,
        )  # fmt: skip
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline), 60)
        assert line == b"ready\n", line

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(30)
        self.proc = None


Rig = tuple[SourceProc, VolumesCapability, dict[str, str]]


def _populate(root: Path) -> dict[str, str]:
    root.mkdir()
    files = {"f1.bin": 4 * MiB, "f2.bin": 2 * MiB + 4321, "small.txt": 10_000, "late.bin": 3 * MiB}
    out = {}
    for name, size in files.items():
        data = os.urandom(size)
        (root / name).write_bytes(data)
        out[name] = hashlib.sha256(data).hexdigest()
    return out


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    ca = FleetCA.load_or_create(tmp_path / "ca")
    # the source image: ext4 with known files, made offline on the volume's data file
    src_vol = tmp_path / "source-vol"
    Volume.create(src_vol, SIZE).close()
    hashes = _populate(tmp_path / "files")
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-E", "nodiscard", "-d", str(tmp_path / "files"),
         str(src_vol / "data")],
        check=True,
    )  # fmt: skip
    _identity(ca, tmp_path / "source-pki", "source")
    source = SourceProc(src_vol, free_port(), tmp_path / "source-pki")
    await source.start()
    settings = load_settings(
        overrides={
            "data_dir": str(tmp_path / "target"),
            # Slow, so the checks happen mid-fill however slow this machine is: the test's
            # own reads are on demand (not rate-limited); late.bin (3 MiB) takes ~24 s.
            "storage.lazy.fill_rate_bytes_per_s": 128 * 1024,
            "storage.lazy.fetch_timeout_s": 60.0,
            "storage.lazy.reconnect_interval_s": 0.1,
        },
        environ={},
    )
    agent = FakeAgent("target", tmp_path / "target" / "agent" / "target")
    _identity(ca, agent.dir / "pki", "target")
    _identity(ca, tmp_path / "intruder-pki", "intruder")
    cap = VolumesCapability(settings)
    await cap.start(agent)  # type: ignore[arg-type]
    try:
        yield source, cap, hashes
    finally:
        if source.proc is None:  # killed by a test that failed before restarting it: the
            await source.start()  # mount's final flush mirrors to it, the unmount waits
        for v in cap.list_volumes():
            if v["attached"]:
                await cap.detach(v["id"])
        await cap.stop()
        source.kill()
        root = str(tmp_path)
        assert not [m for m in read_mountinfo() if m.mount_point.startswith(root)]


async def test_lazy_ext4_volume_from_another_process(rig: Rig, tmp_path: Path) -> None:
    source, cap, hashes = rig
    ep = {"host": "source", "address": "127.0.0.1", "port": source.port, "export": "src"}

    # only the designated peer may open the export
    intruder = HostIdentity(tmp_path / "intruder-pki", "intruder")
    with pytest.raises(PeerUnavailable):
        await NBDClient.connect(
            "127.0.0.1", source.port, "src",
            ssl_context=intruder.client_context(), server_hostname="source",
        )  # fmt: skip

    await cap.create_lazy("disk", SIZE, account="acme", source=ep, mirror="sync")
    target = tmp_path / "mnt"
    target.mkdir()
    await cap.attach("acme.disk", target)

    # contents are right before the fill ends
    for name in ("f1.bin", "f2.bin", "small.txt"):
        assert await asyncio.to_thread(_sha, target / name) == hashes[name]
    info = cap.info("acme.disk")
    assert info["lazy"]["done"] is False, info["lazy"]
    assert info["lazy"]["eta_s"] is None or info["lazy"]["eta_s"] > 0

    # a write on the target goes to both copies (sync mirror)
    new = os.urandom(300_000)
    await asyncio.to_thread((target / "new.bin").write_bytes, new)
    await asyncio.to_thread(os.sync)

    # the source dies mid-fill: progress holds, a read of a missing file waits ...
    before = cap.info("acme.disk")["lazy"]["bytes_present"]
    source.kill(signal.SIGKILL)
    reader = asyncio.ensure_future(asyncio.to_thread(_sha, target / "late.bin"))
    await asyncio.sleep(1.5)
    during = cap.info("acme.disk")["lazy"]["bytes_present"]
    assert before <= during < SIZE
    # ... and completes once the source is back
    await source.start()
    assert await asyncio.wait_for(reader, 120) == hashes["late.bin"]
    cap.set_fill_rate("acme.disk", 0)
    await cap.wait_filled("acme.disk", timeout_s=120)
    after = cap.info("acme.disk")
    assert after["lazy"]["done"] and after["present_bytes"] == SIZE

    assert await asyncio.to_thread(_sha, target / "new.bin") == hashlib.sha256(new).hexdigest()
    await cap.detach("acme.disk")
    assert cap.info("acme.disk")["attached"] is None
    target_sum = await cap.checksum("acme.disk")
    await cap.promote("acme.disk")
    assert cap.info("acme.disk")["kind"] == "plain"
    assert await cap.checksum("acme.disk") == target_sum
    source.kill(signal.SIGTERM)  # flushes
    assert await asyncio.to_thread(_sha, source.vol_dir / "data") == target_sum

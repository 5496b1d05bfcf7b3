"""A host's domain runtime without an agent, for the system tests of domains: domains
with real volumes, namespaces and cgroups under a host name unique to the run, and a
cleanup that removes all of it, also when a test failed."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from edgevisor.migration.domain import Domain, LocalVolumes, clear_stale
from edgevisor.migration.domain_parts import (
    DomainSpec,
    DomainsSettings,
    cgroup_parent,
    netns_prefix,
    slot_address,
)
from edgevisor.storage.attach import AttachSettings
from edgevisor.storage.hostfs import read_mountinfo

KV = Path(__file__).resolve().parents[3] / "examples" / "domains" / "kv" / "kv.py"
PY = os.path.realpath(sys.executable)
SETTINGS = DomainsSettings(backoff_initial_s=0.2, backoff_max_s=1.0, stop_timeout_s=20.0)
ATTACH = AttachSettings(stop_timeout_s=20.0)
SIZE = 64 << 20


class Env:
    """``tag`` starts the host name; ``slot`` numbers the domains' addresses (tests that
    run side by side use different bases)."""

    def __init__(self, root: Path, tag: str, slot: int) -> None:
        self.root = root
        self.host = f"{tag}{os.getpid()}-{root.name[-6:]}"
        self.volumes = LocalVolumes(root / "volumes", ATTACH)
        self.domains: list[Domain] = []
        self._slot = slot

    def domain(self, name: str, command: list[str], restart: str = "never") -> Domain:
        spec = DomainSpec(
            account="acme", name=name, command=tuple(command), volume=f"domain-{name}",
            volume_size_bytes=SIZE, restart=restart, memory_mb=128,  # type: ignore[arg-type]
        )  # fmt: skip
        self._slot += 1
        d = Domain(
            spec, host=self.host, dir=self.root / "domains" / spec.qualified, slot=self._slot,
            address=slot_address(SETTINGS.test_subnet, self._slot), volumes=self.volumes,
            settings=SETTINGS,
        )  # fmt: skip
        self.domains.append(d)
        return d

    def kv(self, name: str = "kv") -> Domain:
        d = self.domain(name, [PY, "-I", "-S", "/task/kv.py", "--port", "8080"])
        d.app_dir.mkdir(parents=True)
        shutil.copy(KV, d.app_dir / "kv.py")
        return d

    def leftovers(self) -> dict[str, list[str]]:
        cg = Path("/sys/fs/cgroup/freezer") / cgroup_parent(self.host)
        return {
            "cgroups": sorted(p.name for p in cg.iterdir() if p.is_dir()) if cg.is_dir() else [],
            "netns": sorted(
                n for n in os.listdir("/run/netns") if n.startswith(netns_prefix(self.host))
            )
            if os.path.isdir("/run/netns")
            else [],
            "mounts": [
                m.mount_point
                for m in read_mountinfo()
                if m.mount_point.startswith(str(self.root) + "/")
            ],
        }


@contextlib.asynccontextmanager
async def domain_env(prefix: str, tag: str, slot: int) -> AsyncIterator[Env]:
    """An :class:`Env` in a fresh directory; afterwards every domain is stopped and what
    is left of them (volumes, mounts, cgroups, the directory) is removed."""
    root = Path(tempfile.mkdtemp(prefix=f"{prefix}-{os.getpid()}-", dir="/tmp"))
    e = Env(root, tag, slot)
    try:
        yield e
    finally:
        for d in e.domains:
            with contextlib.suppress(Exception):  # keep cleaning
                await d.stop()
        await clear_stale(e.host, e.volumes, [d.spec.volume_id for d in e.domains])
        for m in reversed(read_mountinfo()):
            if m.mount_point.startswith(str(root) + "/"):
                subprocess.run(["umount", "-l", m.mount_point], check=False)
        for part in ("memory", "pids", "cpu", "freezer"):
            p = Path("/sys/fs/cgroup") / part / cgroup_parent(e.host)
            if p.is_dir():
                subprocess.run(["rmdir", str(p)], check=False)
        shutil.rmtree(root, ignore_errors=True)

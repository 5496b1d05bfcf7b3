"""The domain runtime's switch path: staging ahead of a start, and the fast quiesce."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from edgevisor.migration.domain import Domain, LocalVolumes, clear_stale
from edgevisor.migration.domain_parts import (
    DomainSpec,
    DomainsSettings,
    cgroup_parent,
    netns_prefix,
    slot_address,
)
from edgevisor.network.netns import instance_ifname, netns_exists
from edgevisor.storage.attach import AttachSettings
from edgevisor.storage.hostfs import is_mounted, read_mountinfo
from edgevisor.tasks.cgroups import CgroupError

pytestmark = [pytest.mark.root, pytest.mark.timeout(240)]

KV = Path(__file__).resolve().parents[3] / "examples" / "domains" / "kv" / "kv.py"
PY = os.path.realpath(sys.executable)
SETTINGS = DomainsSettings(stop_timeout_s=20.0)
SIZE = 64 << 20


class Env:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.host = f"s{os.getpid()}-{root.name[-6:]}"
        self.volumes = LocalVolumes(root / "volumes", AttachSettings(stop_timeout_s=20.0))
        self.domains: list[Domain] = []
        self.hosts = {self.host: self.volumes}  # simulated hosts (another one: ``second``)

    def second(self) -> tuple[str, LocalVolumes]:
        """Another simulated host on this machine, with volumes of its own."""
        host = f"t{os.getpid()}-{self.root.name[-6:]}"
        vols = LocalVolumes(self.root / "volumes-2", AttachSettings(stop_timeout_s=20.0))
        self.hosts[host] = vols
        return host, vols

    def kv(
        self,
        name: str = "kv",
        *,
        host: str | None = None,
        volumes: LocalVolumes | None = None,
        slot: int | None = None,
        settings: DomainsSettings = SETTINGS,
    ) -> Domain:
        spec = DomainSpec(
            account="acme", name=name, command=(PY, "-I", "-S", "/task/kv.py", "--port", "8080"),
            volume=f"domain-{name}", volume_size_bytes=SIZE, restart="never", memory_mb=128,
        )  # fmt: skip
        slot = slot or 3000 + os.getpid() % 900 + len(self.domains)
        host = host or self.host
        d = Domain(
            spec, host=host, dir=self.root / "domains" / host / spec.qualified, slot=slot,
            address=slot_address(SETTINGS.test_subnet, slot),
            volumes=volumes or self.volumes, settings=settings,
        )  # fmt: skip
        d.app_dir.mkdir(parents=True)
        shutil.copy(KV, d.app_dir / "kv.py")
        self.domains.append(d)
        return d

    def cgroups(self) -> list[str]:
        cg = Path("/sys/fs/cgroup/freezer") / cgroup_parent(self.host)
        return sorted(p.name for p in cg.iterdir() if p.is_dir()) if cg.is_dir() else []

    def netns(self) -> list[str]:
        if not os.path.isdir("/run/netns"):
            return []
        return sorted(n for n in os.listdir("/run/netns") if n.startswith(netns_prefix(self.host)))

    def mounts(self) -> list[str]:
        under = str(self.root) + "/"
        return [m.mount_point for m in read_mountinfo() if m.mount_point.startswith(under)]


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    root = Path(tempfile.mkdtemp(prefix=f"evtest-sw-{os.getpid()}-", dir="/tmp"))
    e = Env(root)
    try:
        yield e
    finally:
        for d in e.domains:
            with contextlib.suppress(Exception):  # keep cleaning
                await d.stop()
        for host, vols in e.hosts.items():
            await clear_stale(host, vols, [d.spec.volume_id for d in e.domains])
        for m in reversed(read_mountinfo()):
            if m.mount_point.startswith(str(root) + "/"):
                subprocess.run(["umount", "-l", m.mount_point], check=False)
        for host in e.hosts:
            for part in ("memory", "pids", "cpu", "freezer"):
                p = Path("/sys/fs/cgroup") / part / cgroup_parent(host)
                if p.is_dir():
                    subprocess.run(["rmdir", str(p)], check=False)
        shutil.rmtree(root, ignore_errors=True)


def _http(method: str, url: str, body: bytes | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method=method)
    try:
        with urllib.request.urlopen(req, timeout=5.0) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


async def http(method: str, url: str, body: bytes | None = None) -> tuple[int, bytes]:
    return await asyncio.to_thread(_http, method, url, body)


async def wait_serving(d: Domain, deadline_s: float = 60.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    while True:
        with contextlib.suppress(OSError):
            if (await http("GET", f"http://{d.address}:8080/healthz"))[0] == 200:
                return
        if loop.time() > end:
            raise AssertionError(f"domain not serving; log:\n{d._log_tail()}")
        await asyncio.sleep(0.1)


def _link_exists(ifname: str) -> bool:
    return os.path.exists(f"/sys/class/net/{ifname}")


def _routes_to(address: object) -> str:
    return subprocess.run(
        ["ip", "route", "show", f"{address}/32"], capture_output=True, text=True, check=True
    ).stdout.strip()


async def test_stage_builds_cgroups_and_namespace_and_start_uses_them(env: Env) -> None:
    d = env.kv()
    own = instance_ifname(d.spec.account, d.address)
    await d.stage()
    assert d.phase == "stopped"
    assert env.cgroups() == [d.tag]
    assert env.netns() == [d.netns]
    # the veth waits under a name of its own; neither the volume's data nor the
    # address's routing are touched before the start
    assert _link_exists(d._staged_ifname) and not _link_exists(own)
    assert env.mounts() == [] and _routes_to(d.address) == ""
    await d.stage()  # idempotent
    await d.start()
    assert "cgroups" not in d.timings["start"]  # built by the stage, not again
    assert _link_exists(own) and not _link_exists(d._staged_ifname)
    assert own in _routes_to(d.address)
    await wait_serving(d)
    await d.stop()
    assert (env.netns(), env.cgroups(), env.mounts()) == ([], [], [])
    assert not _link_exists(own)


async def test_staged_veth_renamed_by_ip_when_the_kernel_refuses_a_live_rename(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The start renames the staged veth by rtnetlink; a kernel that renames only links
    that are down (EBUSY) gets the ``ip`` path (down, rename, up, route)."""
    import errno

    from edgevisor.migration import domain_host

    def refuse(ifname: str, new_name: str) -> bool:
        raise OSError(errno.EBUSY, "Device or resource busy")

    monkeypatch.setattr(domain_host, "_rename_link", refuse)
    d = env.kv()
    own = instance_ifname(d.spec.account, d.address)
    await d.stage()
    await d.start()
    assert _link_exists(own) and not _link_exists(d._staged_ifname)
    assert own in _routes_to(d.address)
    await wait_serving(d)


async def test_switch_on_one_machine_keeps_the_address_and_each_side_its_veth(
    env: Env,
) -> None:
    """A migration's switch with both hosts on this machine (as the testbed simulates
    them): the target stages while the source serves at the same address (the same veth
    name), starts after the source's quiesce, and the source's deferred teardown does not
    take the target's veth."""
    lazy_cleanup = SETTINGS.model_copy(update={"quiesce_cleanup_delay_s": 30.0})
    src = env.kv(settings=lazy_cleanup)
    await src.start()
    await wait_serving(src)
    base = f"http://{src.address}:8080/kv"
    assert (await http("PUT", f"{base}/a", b"1"))[0] == 204
    host2, vols2 = env.second()
    dst = env.kv(host=host2, volumes=vols2, slot=src._saved.slot)
    assert dst.address == src.address
    await dst.stage()
    assert await http("GET", f"{base}/a") == (200, b"1")  # the source still serves
    await src.quiesce()
    # the volume moves (here: a copy of the source's, consistent after the quiesce)
    await asyncio.to_thread(
        shutil.copytree, env.volumes.root / src.spec.volume_id, vols2.root / dst.spec.volume_id
    )
    await dst.start()
    await wait_serving(dst)
    await src.wait_torn_down()  # the source's deferred teardown, after the target's start
    assert not netns_exists(src.netns)
    assert await http("GET", f"{base}/a") == (200, b"1")  # served by the target
    assert dst.pid is not None and _link_exists(instance_ifname("acme", dst.address))
    await dst.stop()
    await src.stop()
    assert not _link_exists(instance_ifname("acme", dst.address))


async def test_stage_then_stop_without_start_leaves_nothing(env: Env) -> None:
    d = env.kv()
    await d.stage()
    await d.stop()
    assert (env.netns(), env.cgroups(), env.mounts()) == ([], [], [])


async def test_quiesce_seals_the_filesystem_before_returning_and_tears_down_the_rest_later(
    env: Env,
) -> None:
    d = env.kv()
    await d.start()
    await wait_serving(d)
    base = f"http://{d.address}:8080/kv"
    for i in range(10):
        assert (await http("PUT", f"{base}/k{i}", f"v{i}".encode()))[0] == 204
    await d.quiesce()
    assert d.phase == "stopped"
    # nothing here writes the volume any more: read-only now, unmounted with the rest
    assert os.statvfs(d.mnt).f_flag & os.ST_RDONLY
    assert d.pid is None
    # the address is free at once (a target on this machine uses the same veth name); the
    # namespace itself goes with the rest
    assert not _link_exists(instance_ifname(d.spec.account, d.address))
    assert _routes_to(d.address) == "" and env.cgroups() == []
    await d.wait_torn_down()
    assert (env.netns(), env.cgroups(), env.mounts()) == ([], [], [])
    assert "readonly" in d.timings["quiesce"] and "volume" in d.timings["teardown"]
    # every acknowledged write survived the SIGKILL: resume it (a rollback's resume)
    await d.start()
    await wait_serving(d)
    for i in (0, 9):
        assert await http("GET", f"{base}/k{i}") == (200, f"v{i}".encode())


async def test_start_right_after_quiesce_waits_for_the_background_teardown(env: Env) -> None:
    d = env.kv()
    await d.start()
    await wait_serving(d)
    assert (await http("PUT", f"http://{d.address}:8080/kv/x", b"1"))[0] == 204
    await d.quiesce()
    await d.start()  # no wait in between: must not race the detach of the volume
    await wait_serving(d)
    assert await http("GET", f"http://{d.address}:8080/kv/x") == (200, b"1")
    await d.stop()
    assert (env.netns(), env.cgroups(), env.mounts()) == ([], [], [])


async def test_staged_cgroups_removed_by_someone_are_built_again_at_start(env: Env) -> None:
    d = env.kv()
    await d.stage()
    # what a sweep of empty groups does (staged groups hold the launcher: not empty;
    # without it, they are)
    launcher = _launcher_pid(d)
    os.kill(launcher, signal.SIGKILL)
    await _wait_gone(launcher)
    for part in ("memory", "pids", "cpu", "freezer"):
        await _rmdir_retrying(Path("/sys/fs/cgroup") / part / cgroup_parent(env.host) / d.tag)
    await d.start()
    await wait_serving(d)
    procs = Path("/sys/fs/cgroup/memory") / cgroup_parent(env.host) / d.tag / "cgroup.procs"
    assert procs.read_text().split()  # the domain runs limited, in its groups


def _launcher_pid(d: Domain) -> int:
    """The staged domain's launcher (the only process in its groups before the start)."""
    procs = Path("/sys/fs/cgroup/freezer") / cgroup_parent(d.host) / d.tag / "cgroup.procs"
    pids = [int(p) for p in procs.read_text().split()]
    assert len(pids) == 1, pids
    return pids[0]


def _cmdline(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


async def _wait_gone(pid: int, deadline_s: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    while os.path.exists(f"/proc/{pid}") and _cmdline(pid) != [b""]:
        assert loop.time() < end, f"process {pid} still there"
        await asyncio.sleep(0.05)


async def _rmdir_retrying(path: Path, deadline_s: float = 20.0) -> None:
    """rmdir a cgroup whose last task just exited (the kernel lets go of it a bit later)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    while True:
        try:
            path.rmdir()
            return
        except OSError:
            if loop.time() > end:
                raise
            await asyncio.sleep(0.05)


async def test_stage_leaves_a_launcher_in_the_cgroups_that_runs_nothing_until_the_start(
    env: Env,
) -> None:
    """The sandbox is started ahead as a launcher already in the domain's groups: the
    start at the switch skips their attach (an RCU grace period), and nothing of the
    domain runs before it."""
    d = env.kv()
    await d.stage()
    launcher = _launcher_pid(d)
    argv = _cmdline(launcher)
    assert argv[0] == b"/bin/sh" and b"bwrap" in argv  # still the shell: not started
    await asyncio.sleep(0.2)
    assert _launcher_pid(d) == launcher and _cmdline(launcher)[0] == b"/bin/sh"  # waits
    await d.stage()  # idempotent: the same launcher
    assert _launcher_pid(d) == launcher
    await d.start()
    await wait_serving(d)
    # the launcher became the sandbox (exec, same pid) and its child inherited the groups
    assert d.pid == launcher and _cmdline(launcher)[0] != b"/bin/sh"
    procs = Path("/sys/fs/cgroup/memory") / cgroup_parent(env.host) / d.tag / "cgroup.procs"
    assert len(procs.read_text().split()) >= 2
    await d.stop()
    assert (env.netns(), env.cgroups(), env.mounts()) == ([], [], [])


async def test_stage_then_stop_kills_the_launcher(env: Env) -> None:
    """An abort in prepare: the staged parts, the launcher among them, all go."""
    d = env.kv()
    await d.stage()
    launcher = _launcher_pid(d)
    await d.stop()
    await _wait_gone(launcher)
    assert (env.netns(), env.cgroups(), env.mounts()) == ([], [], [])
    await d.start()  # an ordinary start afterwards (no launcher)
    await wait_serving(d)


async def test_start_after_the_launcher_died_takes_the_ordinary_path(env: Env) -> None:
    d = env.kv()
    await d.stage()
    launcher = _launcher_pid(d)
    os.kill(launcher, signal.SIGKILL)
    await _wait_gone(launcher)
    await d.start()
    await wait_serving(d)
    assert d.pid != launcher


async def test_quiesce_right_after_a_preflush_skips_its_own(env: Env) -> None:
    d = env.kv()
    await d.start()
    await wait_serving(d)
    base = f"http://{d.address}:8080/kv"
    assert (await http("PUT", f"{base}/a", b"1"))[0] == 204
    await d.preflush()
    assert (await http("PUT", f"{base}/b", b"2"))[0] == 204  # after the preflush
    await d.quiesce()
    assert "preflush" not in d.timings["quiesce"]
    await d.start()
    await wait_serving(d)
    # the flush after the freeze carried the write made after the preflush
    assert await http("GET", f"{base}/b") == (200, b"2")
    await asyncio.sleep(0.3)  # no preflush within _PREFLUSH_FRESH_S: the quiesce flushes
    await d.quiesce()
    assert "preflush" in d.timings["quiesce"]


def _sandboxes_named(hostname: str) -> list[int]:
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if hostname.encode() in argv:
                out.append(int(pid))
    return out


async def test_failed_spawn_leaves_no_sandbox_running_regression(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = env.kv(f"fs{os.getpid()}")

    def refuse(pid: int) -> None:
        raise CgroupError("injected")

    monkeypatch.setattr(d._cg, "add", refuse)
    with pytest.raises(CgroupError):
        await d.start()
    assert d.phase == "failed"
    hostname = f"ev-acme-{d.spec.name}"
    loop = asyncio.get_running_loop()
    end = loop.time() + 20
    while _sandboxes_named(hostname) and loop.time() < end:
        await asyncio.sleep(0.1)
    assert _sandboxes_named(hostname) == []
    assert (env.netns(), env.cgroups(), env.mounts()) == ([], [], [])


async def test_delayed_cleanup_waits_unless_someone_needs_it(env: Env) -> None:
    d = env.kv()
    d.settings = SETTINGS.model_copy(update={"quiesce_cleanup_delay_s": 120.0})
    await d.start()
    await wait_serving(d)
    await d.quiesce()
    fuse = env.volumes.attach_dir / d.spec.volume_id / "fuse"
    await asyncio.sleep(0.5)
    assert is_mounted(str(fuse))  # loop and FUSE stay for now; the filesystem is sealed
    assert os.statvfs(d.mnt).f_flag & os.ST_RDONLY
    await asyncio.wait_for(d.wait_torn_down(), 60)  # a waiter cuts the delay short
    assert not is_mounted(str(fuse)) and env.mounts() == []

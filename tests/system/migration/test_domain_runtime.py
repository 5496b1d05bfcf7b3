"""The domain runtime for real: kv on a volume, freeze/thaw, isolation, restarts, cleanup."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import urllib.error
import urllib.request
from collections.abc import AsyncIterator

import pytest
from domain_env import SIZE, Env, domain_env

from edgevisor.errors import Conflict
from edgevisor.migration.domain import Domain, clear_stale
from edgevisor.network.netns import netns_exists

pytestmark = [pytest.mark.root, pytest.mark.timeout(240)]


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    async with domain_env("evtest-dom", "t", os.getpid() % 3000) as e:
        yield e


def _http(
    method: str, url: str, body: bytes | None = None, timeout: float = 5.0
) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


async def http(
    method: str, url: str, body: bytes | None = None, timeout: float = 5.0
) -> tuple[int, bytes]:
    return await asyncio.to_thread(_http, method, url, body, timeout)


async def wait_serving(d: Domain, deadline_s: float = 60.0) -> None:
    url = f"http://{d.address}:8080/healthz"
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    while True:
        try:
            code, _ = await http("GET", url, timeout=2.0)
            if code == 200:
                return
        except OSError:
            pass
        if loop.time() > end:
            raise AssertionError(f"domain not serving; log:\n{d._log_tail()}")
        await asyncio.sleep(0.1)


async def test_kv_data_on_volume_survives_stop_start(env: Env) -> None:
    d = env.kv()
    await d.start()
    await wait_serving(d)
    base = f"http://{d.address}:8080/kv"
    for i in range(20):
        assert (await http("PUT", f"{base}/k{i}", f"v{i}".encode()))[0] == 204
    # on the volume (seen from the host through its mount): the log holds every write
    log = (d.mnt / "kv.log").read_text().splitlines()
    assert len(log) == 20 and '"k19"' in log[-1]
    await d.stop()
    assert d.phase == "stopped"
    assert env.leftovers() == {"cgroups": [], "netns": [], "mounts": []}
    await d.start()
    await wait_serving(d)
    for i in (0, 7, 19):
        assert await http("GET", f"{base}/k{i}") == (200, f"v{i}".encode())


async def test_freeze_stops_serving_and_thaw_resumes(env: Env) -> None:
    d = env.kv()
    await d.start()
    await wait_serving(d)
    url = f"http://{d.address}:8080/healthz"
    await d.freeze()
    assert d.phase == "frozen"
    with pytest.raises(OSError):  # connection accepted by the kernel, never answered
        await http("GET", url, timeout=1.5)
    with pytest.raises(Conflict):
        await d.start()
    await d.thaw()
    assert (await http("GET", url, timeout=10))[0] == 200
    # quiesce: freeze + flush + stop; an acknowledged write is on the volume afterwards
    assert (await http("PUT", f"http://{d.address}:8080/kv/last", b"word"))[0] == 204
    await d.quiesce()
    assert d.phase == "stopped"
    vol = env.volumes.info(d.spec.volume_id)
    assert vol["size_bytes"] == SIZE


async def test_domain_cannot_see_host_processes_or_files(env: Env) -> None:
    script = (
        "ls /proc | grep -E '^[0-9]+$' | wc -l > /data/nprocs; ls / > /data/rootdir; "
        "id -u > /data/uid; ls /work /root /etc/shadow > /data/hostfiles 2>&1; "
        "cat /proc/self/status | grep CapEff > /data/caps; touch /usr/x 2>/data/usr_ro; "
        "exec sleep 1000"
    )
    d = env.domain("peek", ["/bin/sh", "-c", script])
    await d.start()
    for _ in range(200):
        if (d.mnt / "usr_ro").exists():
            break
        await asyncio.sleep(0.05)
    nprocs = int((d.mnt / "nprocs").read_text())
    assert nprocs <= 5, nprocs  # bwrap's init, sh, ls/grep/wc: not the host's hundreds
    assert (d.mnt / "uid").read_text().strip() == "65534"
    assert "No such file" in (d.mnt / "hostfiles").read_text()
    assert "work" not in (d.mnt / "rootdir").read_text().split()
    assert (d.mnt / "caps").read_text().split()[-1] == "0000000000000000"
    assert "Read-only" in (d.mnt / "usr_ro").read_text()
    out = subprocess.run(
        ["ip", "-n", d.netns, "-o", "addr"], capture_output=True, text=True, check=True
    ).stdout
    assert f"{d.address}/32" in out  # its own network namespace with only its address


async def test_restart_on_failure_with_backoff_then_stop(env: Env) -> None:
    d = env.domain("crashy", ["/bin/sh", "-c", "echo run >> /data/runs; exit 3"], "on-failure")
    await d.start()
    for _ in range(300):
        if d.restarts >= 3:
            break
        await asyncio.sleep(0.05)
    assert d.restarts >= 3
    assert d.last_exit == 3
    await d.stop()
    assert d.phase == "stopped"
    assert env.leftovers() == {"cgroups": [], "netns": [], "mounts": []}
    await d.start()  # volume kept its files: one line per run
    await d.stop()


async def test_clean_exit_is_not_restarted_on_failure(env: Env) -> None:
    d = env.domain("once", ["/bin/sh", "-c", "exit 0"], "on-failure")
    await d.start()
    for _ in range(200):
        if d.phase == "exited":
            break
        await asyncio.sleep(0.05)
    assert d.phase == "exited" and d.restarts == 0
    assert env.leftovers() == {"cgroups": [], "netns": [], "mounts": []}


async def test_clear_stale_after_agent_death(env: Env) -> None:
    d = env.kv("stale")
    await d.start()
    await wait_serving(d)
    assert env.leftovers()["netns"] and env.leftovers()["cgroups"]
    # what an agent that died leaves: the supervisor gone, processes killed by the parent
    # death signal, but cgroups, namespace and volume attachment still there
    assert d._supervisor is not None
    d._supervisor.cancel()
    pid = d.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    d._proc.wait()  # type: ignore[union-attr]
    d._proc = None
    report = await clear_stale(env.host, env.volumes, [d.spec.volume_id])
    assert report.netns and report.cgroups and report.volumes == [d.spec.volume_id]
    assert env.leftovers() == {"cgroups": [], "netns": [], "mounts": []}
    d.phase = "stopped"
    assert not netns_exists(d.netns)


async def test_network_can_be_rebuilt_at_once_regression_veth_outlives_netns(env: Env) -> None:
    """Regression: the host end of a veth outlived its deleted namespace for a moment, so
    an immediate re-create of the same domain's network failed with "File exists"."""
    from edgevisor.migration.domain_host import create_domain_netns, remove_domain_netns
    from edgevisor.network.netns import instance_ifname

    d = env.domain("net", ["/bin/true"])
    for _ in range(5):
        ifname = await asyncio.to_thread(create_domain_netns, d.netns, "acme", d.address)
        assert ifname == instance_ifname("acme", d.address)
        await asyncio.to_thread(remove_domain_netns, d.netns, ifname)
    for _ in range(3):  # a stale namespace (removed by name only) does not block either
        await asyncio.to_thread(create_domain_netns, d.netns, "acme", d.address)
        await asyncio.to_thread(remove_domain_netns, d.netns)
    assert not netns_exists(d.netns)

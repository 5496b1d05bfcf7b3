"""Quiesce under trouble (root): a short-lived reference to the volume's mount, a freeze
or flush that fails, the source's deferred cleanup, and the target's "is the service up"
check that holds the fill.

Regression for the flaky QuiesceSource of the migration bench (about one in 70 failed and
failed back). Its one step without any tolerance was umount(2) of the volume: EBUSY at the
first try failed the switch, and any reference to the mount at that moment (a descriptor a
forked child of the agent had not closed yet, a scan of the tree) gives EBUSY. The quiesce
now seals the filesystem read-only instead (refused only by writers, which it waits out;
the unmount moves to the deferred teardown, which waits references out too), names the
holder when one stays, and never leaves a domain frozen when it fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from domain_env import SETTINGS, Env, domain_env

from edgevisor.migration import domain_quiesce as domain_mod
from edgevisor.migration.domain import Domain, DomainError
from edgevisor.migration.domain_host import (
    checkpoint_journal,
    mount_holders,
    seal_readonly,
    unmount,
)
from edgevisor.storage.hostfs import is_mounted, read_mountinfo

pytestmark = [pytest.mark.root, pytest.mark.timeout(240)]


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    async with domain_env("evtest-quiesce", "q", 3000 + os.getpid() % 900) as e:
        yield e


@pytest.fixture
def tmpfs() -> Iterator[Path]:
    """A tmpfs mounted at a fresh directory (removed afterwards, also on failure)."""
    path = Path(tempfile.mkdtemp(prefix=f"evtest-umount-{os.getpid()}-", dir="/tmp"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "evtest", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)
        shutil.rmtree(path, ignore_errors=True)


def _http(method: str, url: str, body: bytes | None = None, timeout: float = 5.0) -> int:
    req = urllib.request.Request(url, data=body, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


async def wait_serving(d: Domain, deadline_s: float = 60.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    while True:
        with contextlib.suppress(OSError):
            if await asyncio.to_thread(_http, "GET", f"http://{d.address}:8080/healthz") == 200:
                return
        if loop.time() > end:
            raise AssertionError(f"domain not serving; log:\n{d._log_tail()}")
        await asyncio.sleep(0.1)


def _freezer_state(d: Domain) -> str | None:
    try:
        return (d._cg.paths["freezer"] / "freezer.state").read_text().strip()
    except OSError:
        return None  # no group: nothing can be frozen


# -- unmount ------------------------------------------------------------------------------


def test_unmount_waits_out_a_short_lived_reference(tmpfs: Path) -> None:
    fd = os.open(tmpfs / "held", os.O_CREAT | os.O_RDWR)
    timer = threading.Timer(0.3, os.close, (fd,))
    timer.start()
    try:
        assert unmount(tmpfs, busy_timeout_s=30.0) is True
    finally:
        timer.join()
    assert not any(m.mount_point == str(tmpfs) for m in read_mountinfo())
    assert unmount(tmpfs) is False  # nothing mounted there any more


def test_unmount_that_stays_busy_names_the_holder(tmpfs: Path) -> None:
    fd = os.open(tmpfs / "held", os.O_CREAT | os.O_RDWR)
    try:
        assert any(h.startswith(f"{os.getpid()} ") for h in mount_holders(tmpfs))
        with pytest.raises(DomainError, match=rf"busy.*held by {os.getpid()} "):
            unmount(tmpfs, busy_timeout_s=0.05)
    finally:
        os.close(fd)
    assert mount_holders(tmpfs) == []
    assert unmount(tmpfs) is True


def test_seal_waits_out_a_short_lived_writer_then_nothing_writes(tmpfs: Path) -> None:
    fd = os.open(tmpfs / "held", os.O_CREAT | os.O_WRONLY)  # a writer: remount refuses
    timer = threading.Timer(0.3, os.close, (fd,))
    timer.start()
    try:
        assert seal_readonly(tmpfs, busy_timeout_s=30.0) is True
    finally:
        timer.join()
    assert os.statvfs(tmpfs).f_flag & os.ST_RDONLY
    with pytest.raises(OSError, match="Read-only"):
        (tmpfs / "new").write_bytes(b"x")
    readers = os.open(tmpfs / "held", os.O_RDONLY)  # readers never block it
    try:
        assert seal_readonly(tmpfs) is True
    finally:
        os.close(readers)


def test_seal_that_stays_busy_names_the_writer(tmpfs: Path) -> None:
    fd = os.open(tmpfs / "held", os.O_CREAT | os.O_WRONLY)
    try:
        with pytest.raises(DomainError, match=rf"read-only: .*busy.*held by {os.getpid()} "):
            seal_readonly(tmpfs, busy_timeout_s=0.05)
    finally:
        os.close(fd)
    assert seal_readonly(tmpfs) is True


def test_seal_of_nothing_mounted(tmp_path: Path) -> None:
    assert seal_readonly(tmp_path) is False


def test_checkpoint_journal_only_where_there_is_one(tmpfs: Path) -> None:
    assert checkpoint_journal(tmpfs) is False  # tmpfs: no journal, nothing to do


# -- quiesce ------------------------------------------------------------------------------


async def test_quiesce_waits_out_a_reference_to_the_volume(env: Env) -> None:
    d = env.kv()
    await d.start()
    await wait_serving(d)
    assert await asyncio.to_thread(_http, "PUT", f"http://{d.address}:8080/kv/a", b"1") == 204
    assert checkpoint_journal(d.mnt) is True  # the volume is ext4: it has a journal
    # a file of the volume held open for writing on the host for a moment
    fd = os.open(d.mnt / "kv.log", os.O_WRONLY | os.O_APPEND)
    timer = threading.Timer(0.5, os.close, (fd,))
    timer.start()
    try:
        await d.quiesce()
    finally:
        timer.join()
    assert d.phase == "stopped"
    steps = {"preflush", "checkpoint", "freeze", "syncfs", "readonly"}
    assert steps <= set(d.timings["quiesce"])
    assert os.statvfs(d.mnt).f_flag & os.ST_RDONLY  # sealed now, unmounted in the background
    await d.wait_torn_down()
    assert not any(m.mount_point == str(d.mnt) for m in read_mountinfo())
    await d.start()  # the data survived
    await wait_serving(d)
    assert await asyncio.to_thread(_http, "GET", f"http://{d.address}:8080/kv/a") == 200


async def test_quiesce_under_writes_keeps_every_acknowledged_one(env: Env) -> None:
    """The seal starts with the SIGKILLs, while the killed service still holds its log
    open for writing: it must succeed only once that is closed, and every write the
    service acknowledged before the freeze must be on the volume afterwards."""
    d = env.kv()
    await d.start()
    await wait_serving(d)
    base = f"http://{d.address}:8080/kv"
    acked: list[int] = []
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set():
            try:
                if _http("PUT", f"{base}/w{i}", str(i).encode(), timeout=2.0) == 204:
                    acked.append(i)
            except OSError:
                pass  # the quiesce cut it off: not acknowledged
            i += 1

    t = threading.Thread(target=writer)
    t.start()
    try:
        loop = asyncio.get_running_loop()
        end = loop.time() + 30
        while len(acked) < 20:
            assert loop.time() < end, "no writes acknowledged"
            await asyncio.sleep(0.02)
        await d.quiesce()
    finally:
        stop.set()
        await asyncio.to_thread(t.join, 10)
    assert d.phase == "stopped"
    assert {"kill", "cgroups", "readonly"} <= set(d.timings["quiesce"])
    await d.start()
    await wait_serving(d)
    for i in (acked[0], acked[len(acked) // 2], acked[-1]):
        assert await asyncio.to_thread(_http, "GET", f"{base}/w{i}") == 200, i


async def test_failed_freeze_leaves_the_domain_running(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = env.kv()
    await d.start()
    await wait_serving(d)
    real = domain_mod.set_freezer

    async def times_out(cg: object, state: str, timeout_s: float) -> None:
        await real(cg, state, timeout_s)  # type: ignore[arg-type]
        if state == "FROZEN":  # frozen, yet the caller hears a timeout (tasks in D state)
            raise DomainError("cgroup did not reach FROZEN within 20.0 s")

    monkeypatch.setattr(domain_mod, "set_freezer", times_out)
    with pytest.raises(DomainError, match="freeze failed"):
        await d.quiesce()
    assert d.phase == "running"
    assert _freezer_state(d) == "THAWED"
    await wait_serving(d, deadline_s=20)


async def test_failed_flush_after_freeze_stops_instead_of_leaving_it_frozen(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before, an OSError of the frozen flush escaped with the domain frozen: a resume
    (``start``) was then refused ("frozen; thaw it first") and fail-back stuck."""
    d = env.kv()
    await d.start()
    await wait_serving(d)
    assert await asyncio.to_thread(_http, "PUT", f"http://{d.address}:8080/kv/b", b"2") == 204
    real = domain_mod.syncfs

    def fails_when_frozen(path: Path) -> None:
        if d.phase == "frozen":
            raise OSError(5, "Input/output error")
        real(path)

    monkeypatch.setattr(domain_mod, "syncfs", fails_when_frozen)
    with pytest.raises(DomainError, match=r"quiesce failed.*Input/output error"):
        await d.quiesce()
    assert d.phase == "stopped"
    assert _freezer_state(d) is None  # torn down, not frozen
    assert not any(m.mount_point == str(d.mnt) for m in read_mountinfo())
    monkeypatch.undo()
    await d.start()  # what a fail-back's ResumeOnSource does
    await wait_serving(d)
    assert await asyncio.to_thread(_http, "GET", f"http://{d.address}:8080/kv/b") == 200


async def test_failed_seal_tears_down_and_the_domain_starts_again(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = env.kv()
    await d.start()
    await wait_serving(d)

    def busy(path: Path, *, busy_timeout_s: float = 0.0, poll_s: float = 0.001) -> bool:
        raise DomainError(f"cannot make {path} read-only: busy (held by 1 (x))")

    monkeypatch.setattr(domain_mod, "seal_readonly", busy)
    with pytest.raises(DomainError, match="held by"):
        await d.quiesce()
    assert d.phase == "stopped"
    assert _freezer_state(d) is None
    monkeypatch.undo()
    await d.start()
    await wait_serving(d)


# -- the source's deferred cleanup ----------------------------------------------------------


async def test_an_unhurried_wait_keeps_the_cleanup_delay_until_someone_hurries(
    env: Env,
) -> None:
    """A migration's demotion of the source waits for the volume's detach without
    hurrying it (before, it cut the delay short at the switch, so the source's cleanup
    competed with the target's start); a lifecycle call still cuts it short."""
    d = env.kv()
    d.settings = SETTINGS.model_copy(update={"quiesce_cleanup_delay_s": 120.0})
    await d.start()
    await wait_serving(d)
    await d.quiesce()
    fuse = env.volumes.attach_dir / d.spec.volume_id / "fuse"
    waiter = asyncio.ensure_future(d.wait_torn_down(hurry=False))
    await asyncio.sleep(1.0)
    assert not waiter.done()
    assert is_mounted(str(fuse))  # the delay holds
    await asyncio.wait_for(d.start(), 60)  # a lifecycle call hurries it (and starts again)
    await asyncio.wait_for(waiter, 60)
    await wait_serving(d)


# -- the fill's hold: is the service up? ----------------------------------------------------


async def test_wait_listening_sees_the_service_and_times_out_without_one(env: Env) -> None:
    kv = env.kv()
    assert await kv.wait_listening(0.1) is False  # not running
    await kv.start()
    assert await kv.wait_listening(60.0) is True
    await wait_serving(kv)  # listening meant it answers
    quiet = env.domain("quiet", ["/bin/sleep", "600"])
    await quiet.start()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    assert await quiet.wait_listening(0.3) is False
    assert loop.time() - t0 >= 0.3

"""Isolated environments for real: namespaces, cgroup limits, uid and capability drop."""

from __future__ import annotations

import os
import socket
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from edgevisor.tasks.cgroups import CGROUP_ROOT, CONTROLLERS, PARENT
from edgevisor.tasks.environment import EnvSpec
from edgevisor.tasks.isolation import IsolatedEnvironment
from edgevisor.tasks.sandbox import HandlerLoadError, IsolatedFactory, SandboxSettings

pytestmark = pytest.mark.root

HANDLERS = textwrap.dedent(
    """
    import errno, os, signal, socket, sys, time

    TOKEN = os.urandom(8).hex()
    LOADS = [1]

    def whoami(event, context):
        status = dict(
            line.split(":\\t", 1) for line in open("/proc/self/status").read().splitlines()
            if ":\\t" in line
        )
        return {"pid": os.getpid(), "token": TOKEN, "loads": len(LOADS),
                "uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(),
                "cap_eff": status["CapEff"].strip(), "cap_bnd": status["CapBnd"].strip(),
                "cap_prm": status["CapPrm"].strip(), "nnp": status["NoNewPrivs"].strip(),
                "cwd": os.getcwd(), "root": sorted(os.listdir("/")),
                "hostname": socket.gethostname()}

    def try_read(event, context):
        out = {}
        for path in event:
            try:
                with open(path, "rb") as f:
                    out[path] = "read:" + f.read(64).decode("latin-1")
            except OSError as exc:
                out[path] = "denied:" + errno.errorcode.get(exc.errno, str(exc.errno))
        return out

    def try_write(event, context):
        out = {}
        for path, size in event:
            try:
                with open(path, "wb") as f:
                    f.write(b"x" * size)
                out[path] = "ok"
            except OSError as exc:
                out[path] = errno.errorcode.get(exc.errno, str(exc.errno))
        return out

    def procs(event, context):
        pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
        cmds = {p: open(f"/proc/{p}/cmdline", "rb").read().split(b"\\0")[0].decode()
                for p in pids}
        return {"pids": pids, "cmds": cmds}

    def net(event, context):
        names = [name for _, name in socket.if_nameindex()]
        s = socket.socket()
        s.settimeout(3)
        try:
            s.connect(("127.0.0.1", event))
            result = "connected"
        except OSError as exc:
            result = type(exc).__name__
        finally:
            s.close()
        return {"ifaces": names, "connect": result}

    def eat(event, context):
        hog = []
        while True:
            hog.append(bytearray(4 << 20))

    def forkbomb(event, context):
        r, w = os.pipe()
        kids, error = [], None
        for _ in range(500):
            try:
                pid = os.fork()
            except OSError as exc:
                error = type(exc).__name__
                break
            if pid == 0:
                os.close(w)
                os.read(r, 1)
                os._exit(0)
            kids.append(pid)
        os.close(w)
        for pid in kids:
            os.waitpid(pid, 0)
        os.close(r)
        return {"forked": len(kids), "error": error}

    def spin(event, context):
        while True:
            pass

    def segv(event, context):
        os.kill(os.getpid(), signal.SIGSEGV)

    def scribble(event, context):
        for fd in range(3, 32):
            try:
                os.write(fd, b"\\x7f\\xff\\xff\\xffjunk")
            except OSError:
                pass
        return "scribbled"
    """
)


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    d = tmp_path / "bundle"
    d.mkdir()
    (d / "handlers.py").write_text(HANDLERS)
    (d / "data.txt").write_text("bundle data")
    d.chmod(0o755)
    tmp_path.chmod(0o755)
    return d


@pytest.fixture
def agent_secret(tmp_path: Path) -> Path:
    secret_dir = tmp_path / "agent-data"
    secret_dir.mkdir(mode=0o755)
    secret = secret_dir / "secret.db"
    secret.write_text("agent secret")
    secret.chmod(0o644)  # readable by anyone on the host: only the mount namespace hides it
    return secret


@pytest.fixture
def factory() -> Iterator[IsolatedFactory]:
    f = IsolatedFactory(SandboxSettings(start_timeout_s=60))
    try:
        yield f
    finally:
        f.close()


@pytest.fixture
async def envs() -> AsyncIterator[list[IsolatedEnvironment]]:
    made: list[IsolatedEnvironment] = []
    try:
        yield made
    finally:
        for env in made:
            await env.close()
            for c in CONTROLLERS:
                assert not (CGROUP_ROOT / c / PARENT / env.cgroup_name).exists()


def spec(bundle: Path, handler: str, **kw: Any) -> EnvSpec:
    base: dict[str, Any] = dict(
        task="iso-test", version="v1", bundle_dir=bundle, runtime="python",
        handler=handler if ":" in handler else f"handlers:{handler}", memory_mb=128, cpu=1.0,
        timeout_s=30.0, pids_max=32, tmp_mb=8,
    )
    base.update(kw)
    return EnvSpec(**base)


async def started(
    factory: IsolatedFactory, envs: list[IsolatedEnvironment], s: EnvSpec
) -> IsolatedEnvironment:
    env = factory.create(s)
    assert isinstance(env, IsolatedEnvironment)
    envs.append(env)
    await env.start()
    return env


async def call(env: IsolatedEnvironment, event: Any = None) -> Any:
    out = await env.invoke(event, {})
    assert out.status == "ok", out.error
    return out.result


async def test_runs_unprivileged_without_capabilities_in_a_new_root(
    factory: IsolatedFactory, envs: list[IsolatedEnvironment], bundle: Path
) -> None:
    env = await started(factory, envs, spec(bundle, "whoami"))
    me = await call(env)
    assert me["uid"] == 65534 and me["gid"] == 65534 and me["groups"] == []
    assert int(me["cap_eff"], 16) == 0
    assert int(me["cap_prm"], 16) == 0
    assert int(me["cap_bnd"], 16) == 0
    assert me["nnp"] == "1"
    assert me["cwd"] == "/task"
    assert "work" not in me["root"] and "etc" not in me["root"] and "home" not in me["root"]
    assert {"task", "tmp", "proc", "usr"} <= set(me["root"])
    assert me["hostname"] == "ev-iso-test"


async def test_warm_reuse_costs_no_process_start(
    factory: IsolatedFactory, envs: list[IsolatedEnvironment], bundle: Path
) -> None:
    env = await started(factory, envs, spec(bundle, "whoami"))
    members = set(env._cg.pids())  # host pids in the environment's cgroup
    first = await call(env)
    second = await call(env)
    assert first["token"] == second["token"]  # the same process, module loaded once
    assert first["pid"] == second["pid"] == 2
    assert second["loads"] == 1
    assert set(env._cg.pids()) == members


async def test_cannot_read_outside_bundle_and_tmp(
    factory: IsolatedFactory, envs: list[IsolatedEnvironment], bundle: Path, agent_secret: Path
) -> None:
    assert agent_secret.read_text() == "agent secret"  # the host can
    env = await started(factory, envs, spec(bundle, "try_read"))
    paths = [str(agent_secret), "/etc/passwd", "/etc/shadow", "/root/.bashrc",
             str(bundle / "data.txt"), "/task/data.txt"]
    got = await call(env, paths)
    assert got[str(agent_secret)] == "denied:ENOENT"
    assert got["/etc/passwd"] == "denied:ENOENT"
    assert got["/etc/shadow"] == "denied:ENOENT"
    assert got["/root/.bashrc"] == "denied:ENOENT"
    assert got[str(bundle / "data.txt")] == "denied:ENOENT"  # host path of the bundle
    assert got["/task/data.txt"] == "read:bundle data"


async def test_bundle_is_read_only_and_tmp_is_private_and_sized(
    factory: IsolatedFactory, envs: list[IsolatedEnvironment], bundle: Path
) -> None:
    env = await started(factory, envs, spec(bundle, "try_write", tmp_mb=4))
    got = await call(env, [["/task/new.txt", 1], ["/tmp/ok.bin", 1024],
                           ["/tmp/big.bin", 6 * 1024 * 1024], ["/usr/evil", 1]])
    assert got["/task/new.txt"] == "EROFS"
    assert got["/tmp/ok.bin"] == "ok"
    assert got["/tmp/big.bin"] == "ENOSPC"
    assert got["/usr/evil"] in ("EROFS", "EACCES")
    assert not (bundle / "new.txt").exists()
    assert not Path("/tmp/ok.bin").exists()


async def test_cannot_see_other_processes(
    factory: IsolatedFactory, envs: list[IsolatedEnvironment], bundle: Path
) -> None:
    env = await started(factory, envs, spec(bundle, "procs"))
    got = await call(env)
    # pid 1 is the sandbox's init (bwrap), pid 2 the runtime; nothing of the host.
    assert got["pids"] == [1, 2]
    assert got["cmds"]["2"].endswith("python3.11") or "python" in got["cmds"]["2"]
    assert str(os.getpid()) not in got["cmds"]


async def test_has_no_network_by_default(
    factory: IsolatedFactory, envs: list[IsolatedEnvironment], bundle: Path
) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    try:
        env = await started(factory, envs, spec(bundle, "net"))
        got = await call(env, port)
        assert got["ifaces"] == ["lo"]
        assert got["connect"] == "ConnectionRefusedError"
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing reached the host's listener
        host_env = await started(factory, envs, spec(bundle, "net", network="host"))
        host_got = await call(host_env, port)
        assert host_got["connect"] == "connected"  # the opt-in knob does give the host's
        assert len(host_got["ifaces"]) >= 1
    finally:
        listener.close()


async def test_memory_bomb_is_oom_killed_and_reported_with_the_limit(
    factory: IsolatedFactory, envs: list[IsolatedEnvironment], bundle: Path
) -> None:
    env = await started(factory, envs, spec(bundle, "eat", memory_mb=48))
    out = await env.invoke(None, {})
    assert out.status == "oom"
    assert out.error is not None
    assert out.error["limit_mb"] == 48
    assert out.error["message"] == "memory limit exceeded (48 MB)"
    assert not env.healthy


async def test_fork_bomb_stops_at_the_pids_limit(
    factory: IsolatedFactory, envs: list[IsolatedEnvironment], bundle: Path
) -> None:
    env = await started(factory, envs, spec(bundle, "forkbomb", pids_max=16))
    got = await call(env)
    assert got["error"] == "BlockingIOError"  # EAGAIN from pids.max
    assert 0 < got["forked"] <= 14  # 16 minus the init and the runtime
    assert env.healthy
    again = await call(env)  # the children are gone: the same room again
    assert again["forked"] == got["forked"]


async def test_timeout_kills_the_environment_and_is_reported(
    factory: IsolatedFactory, envs: list[IsolatedEnvironment], bundle: Path
) -> None:
    env = await started(factory, envs, spec(bundle, "spin", timeout_s=1.0, cpu=0.2))
    quota = (CGROUP_ROOT / "cpu" / PARENT / env.cgroup_name / "cpu.cfs_quota_us").read_text()
    assert int(quota) == 20000
    members = env._cg.pids()
    assert members
    out = await env.invoke(None, {})
    assert out.status == "timeout"
    assert out.error is not None and out.error["timeout_s"] == 1.0
    assert not env.healthy
    assert env._cg.pids() == []
    for pid in members:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


async def test_crash_reports_the_signal(
    factory: IsolatedFactory, envs: list[IsolatedEnvironment], bundle: Path
) -> None:
    env = await started(factory, envs, spec(bundle, "segv"))
    out = await env.invoke(None, {})
    assert out.status == "crashed"
    assert out.error is not None and out.error["signal"] == "SIGSEGV"
    assert not env.healthy


async def test_garbage_on_the_protocol_pipe_kills_only_that_environment(
    factory: IsolatedFactory, envs: list[IsolatedEnvironment], bundle: Path
) -> None:
    bystander = await started(factory, envs, spec(bundle, "whoami", task="bystander"))
    env = await started(factory, envs, spec(bundle, "scribble"))
    out = await env.invoke(None, {})
    assert out.status == "crashed"
    assert out.error is not None and out.error["type"] == "ProtocolError"
    assert not env.healthy
    assert env._cg.pids() == []
    assert (await call(bystander))["uid"] == 65534


async def test_import_failure_is_rejected_and_cleaned_up(
    factory: IsolatedFactory, bundle: Path
) -> None:
    (bundle / "broken.py").write_text("import nonexistent_dependency\n")
    env = factory.create(spec(bundle, "broken:handler"))
    assert isinstance(env, IsolatedEnvironment)
    with pytest.raises(HandlerLoadError, match="nonexistent_dependency"):
        await env.start()
    for c in CONTROLLERS:
        assert not (CGROUP_ROOT / c / PARENT / env.cgroup_name).exists()

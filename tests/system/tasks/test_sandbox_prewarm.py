"""Prewarmed isolated environments ("stems"): taken over by a task, limited, cleaned up."""

from __future__ import annotations

import asyncio
import os
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from edgevisor.tasks.cgroups import CGROUP_ROOT, CONTROLLERS, PARENT
from edgevisor.tasks.environment import EnvSpec
from edgevisor.tasks.isolation import IsolatedEnvironment
from edgevisor.tasks.sandbox import HandlerLoadError, IsolatedFactory, SandboxSettings

pytestmark = pytest.mark.root

HANDLER = textwrap.dedent(
    """
    import os
    def info(event, context):
        try:
            open(event, "rb").read()
            secret = "readable"
        except OSError as exc:
            secret = type(exc).__name__
        return {"uid": os.getuid(), "pid": os.getpid(), "greeting": os.environ.get("GREETING"),
                "files": sorted(os.listdir("/task")), "secret": secret}
    def eat(event, context):
        hog = []
        while True:
            hog.append(bytearray(4 << 20))
    """
)


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    d = tmp_path / "bundle"
    d.mkdir()
    (d / "app.py").write_text(HANDLER)
    (d / "broken.py").write_text("raise ImportError('broken on purpose')\n")
    tmp_path.chmod(0o755)
    d.chmod(0o755)
    return d


@pytest.fixture
async def factory() -> AsyncIterator[IsolatedFactory]:
    f = IsolatedFactory(SandboxSettings(start_timeout_s=60))
    stage_root = f._stage_root
    try:
        yield f
    finally:
        await f.aclose()
        assert not stage_root.exists()
        leftovers = [
            p.name for c in CONTROLLERS for p in (CGROUP_ROOT / c / PARENT).glob(
                f"stem-{os.getpid()}-*"
            )
        ]
        assert leftovers == []


def spec(bundle: Path, handler: str = "app:info", **kw: Any) -> EnvSpec:
    base: dict[str, Any] = dict(
        task="warm-task", version="v1", bundle_dir=bundle, runtime="python", handler=handler,
        memory_mb=96, cpu=0.5, timeout_s=30.0, pids_max=20, tmp_mb=64,
        env={"GREETING": "hello"},
    )
    base.update(kw)
    return EnvSpec(**base)


async def wait_pool(factory: IsolatedFactory, n: int, network: str = "none") -> None:
    deadline = time.monotonic() + 60
    while factory.pool.size(network, 64) < n:
        assert time.monotonic() < deadline, "pool was not refilled"
        await asyncio.sleep(0.02)


async def test_task_takes_over_a_prewarmed_sandbox_with_its_limits(
    factory: IsolatedFactory, bundle: Path, tmp_path: Path
) -> None:
    secret = tmp_path / "agent-secret"
    secret.write_text("s")
    secret.chmod(0o644)
    await factory.prewarm(1)
    assert factory.pool.size() == 1
    env = factory.create(spec(bundle))
    assert isinstance(env, IsolatedEnvironment)
    try:
        await env.start()
        assert env.from_stem
        out = await env.invoke(str(secret), {})
        assert out.status == "ok", out.error
        assert out.result == {"uid": 65534, "pid": 2, "greeting": "hello",
                              "files": ["app.py", "broken.py"], "secret": "FileNotFoundError"}
        cg = env.cgroup_name
        mem = CGROUP_ROOT / "memory" / PARENT / cg
        assert int((mem / "memory.limit_in_bytes").read_text()) == 96 << 20
        assert (CGROUP_ROOT / "pids" / PARENT / cg / "pids.max").read_text().strip() == "20"
        assert int((CGROUP_ROOT / "cpu" / PARENT / cg / "cpu.cfs_quota_us").read_text()) == 50000
        await wait_pool(factory, 1)  # a replacement was started in the background
    finally:
        await env.close()
    for c in CONTROLLERS:
        assert not (CGROUP_ROOT / c / PARENT / cg).exists()


async def test_oom_in_a_prewarmed_sandbox_reports_the_task_limit(
    factory: IsolatedFactory, bundle: Path
) -> None:
    await factory.prewarm(1)
    env = factory.create(spec(bundle, "app:eat", memory_mb=40))
    try:
        await env.start()
        assert env.from_stem
        out = await env.invoke(None, {})
        assert out.status == "oom"
        assert out.error is not None and out.error["limit_mb"] == 40
    finally:
        await env.close()


async def test_other_network_mode_starts_cold(factory: IsolatedFactory, bundle: Path) -> None:
    await factory.prewarm(1)
    env = factory.create(spec(bundle, network="host"))
    try:
        await env.start()
        assert not env.from_stem
        assert factory.pool.size() == 1
    finally:
        await env.close()


async def test_handler_that_fails_to_load_in_a_stem_is_rejected_and_cleaned_up(
    factory: IsolatedFactory, bundle: Path
) -> None:
    await factory.prewarm(1)
    env = factory.create(spec(bundle, "broken:handler"))
    assert isinstance(env, IsolatedEnvironment)
    with pytest.raises(HandlerLoadError, match="broken on purpose"):
        await env.start()
    assert env.from_stem and not env.healthy
    for c in CONTROLLERS:
        assert not (CGROUP_ROOT / c / PARENT / env.cgroup_name).exists()

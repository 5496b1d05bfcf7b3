"""The Coordinator with the real plain environment (``tasks.sandbox.PlainFactory``) and
the example tasks: cold then warm, logs, a command task, a handler error."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from edgevisor.tasks.service import Coordinator, CoordinatorSettings
from edgevisor.tasks.spec import SpecError

sandbox = pytest.importorskip("edgevisor.tasks.sandbox")

pytestmark = pytest.mark.timeout(120)

EXAMPLES = Path(__file__).resolve().parents[3] / "examples" / "tasks"


@pytest.fixture
async def coord(tmp_path: Path) -> AsyncIterator[Coordinator]:
    factory = sandbox.PlainFactory()
    c = Coordinator(factory, CoordinatorSettings(memory_mb=512, max_envs=4), tmp_path / "data")
    await c.start()
    try:
        yield c
    finally:
        await c.close()
        factory.close()


async def test_example_tasks_cold_then_warm(coord: Coordinator) -> None:
    await coord.deploy(EXAMPLES / "hello")
    cold = await coord.invoke("hello", {"name": "edge"})
    assert cold.status == "succeeded", cold.error
    assert cold.result["message"] == "Hello, edge!"
    assert "greeting edge" in cold.logs
    assert cold.init_s is not None and cold.init_s > 0
    warm = await coord.invoke("hello", {"name": "again"})
    assert warm.status == "succeeded" and warm.init_s == 0.0
    assert warm.result["warm_for_s"] >= cold.result["warm_for_s"]  # same process, reused

    await coord.deploy(EXAMPLES / "wordcount")
    r = await coord.invoke("wordcount", {"text": "one two three four"})
    assert r.status == "succeeded", r.error
    assert r.result == {"words": 4}


async def test_handler_error_and_bad_bundle(coord: Coordinator, tmp_path: Path) -> None:
    bundle = tmp_path / "raiser"
    shutil.copytree(EXAMPLES / "hello", bundle)
    (bundle / "edgevisor.toml").write_text(
        'name = "raiser"\nruntime = "python"\nhandler = "main:handler"\nmemory = "64M"\n'
    )
    (bundle / "main.py").write_text("def handler(event, context):\n    raise KeyError(event)\n")
    await coord.deploy(bundle)
    r = await coord.invoke("raiser", "nope")
    assert r.status == "failed" and r.error is not None
    assert r.error["type"] == "KeyError"
    (bundle / "main.py").write_text("import does_not_exist\n")
    with pytest.raises(SpecError) as info:
        await coord.deploy(bundle)
    assert info.value.field == "handler"
    assert "does_not_exist" in info.value.reason

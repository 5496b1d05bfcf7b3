"""Tasks and calls in the SDK: wire models, call descriptions, and the client mixins."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from edgevisor.sdk.calls import Call, _many, _none, _one

T = TypeVar("T")


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class TaskInfo(_Model):
    name: str
    account: str
    version: str = Field(description="Digest of the bundle and the effective spec.")
    bundle: str = Field(description="Content digest of the bundle.")
    spec: dict[str, Any] = Field(description="The effective manifest, units in field names.")
    hosts: list[str] = Field(default_factory=list, description="Hosts it is deployed on.")
    deployed_at: float


class CallAccepted(_Model):
    id: str = Field(description="Call id: <host>:<id>.")
    status: str = "queued"


class CallInfo(_Model):
    id: str
    task: str
    account: str | None = None
    version: str
    status: str = Field(description="queued|running|succeeded|failed|timeout|oom|crashed")
    event: Any = None
    result: Any = None
    error: dict[str, Any] | None = None
    idempotency_key: str | None = None
    priority: int = 0
    queue_wait_s: float | None = None
    init_s: float | None = None
    run_s: float | None = None
    logs: str = ""
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None

    @property
    def ok(self) -> bool:
        return self.status == "succeeded"


def pack_bundle(source: Path) -> bytes:
    """A directory as .tar.gz bytes; an archive file as its bytes."""
    if source.is_file():
        return source.read_bytes()
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: no such directory or archive")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for path in sorted(source.rglob("*")):
            rel = path.relative_to(source)
            if any(part in ("__pycache__", ".git") for part in rel.parts):
                continue
            tf.add(path, arcname=rel.as_posix(), recursive=False)
    return buf.getvalue()


def _params(**kw: Any) -> dict[str, Any]:
    return {k: v for k, v in kw.items() if v is not None}


def deploy_task(
    archive: bytes,
    *,
    account: str | None = None,
    name: str | None = None,
    memory: str | None = None,
    cpu: float | None = None,
    timeout: str | None = None,
    concurrency: int | None = None,
    hosts: list[str] | None = None,
) -> Call[TaskInfo]:
    params = _params(
        account=account, name=name, memory=memory, cpu=cpu, timeout=timeout,
        concurrency=concurrency, host=hosts or None,
    )  # fmt: skip
    return Call("POST", "/v1/tasks", _one(TaskInfo), content=archive, params=params)


def list_tasks() -> Call[list[TaskInfo]]:
    return Call("GET", "/v1/tasks", _many(TaskInfo))


def get_task(name: str, account: str | None = None) -> Call[TaskInfo]:
    return Call("GET", f"/v1/tasks/{name}", _one(TaskInfo), params=_params(account=account))


def remove_task(name: str, account: str | None = None) -> Call[None]:
    return Call("DELETE", f"/v1/tasks/{name}", _none, params=_params(account=account))


def invoke(
    name: str,
    event: Any = None,
    *,
    account: str | None = None,
    host: str | None = None,
    priority: int | None = None,
    idempotency_key: str | None = None,
) -> Call[CallInfo]:
    return Call(
        "POST",
        f"/v1/tasks/{name}/invoke",
        _one(CallInfo),
        content=json.dumps(event).encode(),
        params=_params(account=account, host=host, priority=priority),
        headers=_params(**{"idempotency-key": idempotency_key}),
    )


def invoke_async(
    name: str,
    event: Any = None,
    *,
    account: str | None = None,
    host: str | None = None,
    priority: int | None = None,
    idempotency_key: str | None = None,
) -> Call[CallAccepted]:
    return Call(
        "POST",
        f"/v1/tasks/{name}/invoke",
        _one(CallAccepted),
        content=json.dumps(event).encode(),
        params=_params(account=account, host=host, priority=priority, **{"async": "true"}),
        headers=_params(**{"idempotency-key": idempotency_key}),
    )


def get_call(call_id: str, wait_s: float | None = None) -> Call[CallInfo]:
    return Call("GET", f"/v1/calls/{call_id}", _one(CallInfo), params=_params(wait=wait_s))


class TasksMixin:
    """Tasks and calls for :class:`edgevisor.Client`."""

    if TYPE_CHECKING:

        def call(self, call: Call[T]) -> T: ...

    def deploy_task(self, source: Path | bytes, **options: Any) -> TaskInfo:
        """Deploy a directory or a .tar.gz/.zip (path or bytes); options as the CLI's."""
        data = source if isinstance(source, bytes) else pack_bundle(Path(source))
        return self.call(deploy_task(data, **options))

    def list_tasks(self) -> list[TaskInfo]:
        return self.call(list_tasks())

    def get_task(self, name: str, account: str | None = None) -> TaskInfo:
        return self.call(get_task(name, account))

    def remove_task(self, name: str, account: str | None = None) -> None:
        self.call(remove_task(name, account))

    def invoke(self, name: str, event: Any = None, **options: Any) -> CallInfo:
        """Run a call and wait for its record (result or error, timings, logs)."""
        return self.call(invoke(name, event, **options))

    def invoke_async(self, name: str, event: Any = None, **options: Any) -> CallAccepted:
        """Queue a call; it is durable on its host once this returns."""
        return self.call(invoke_async(name, event, **options))

    def get_call(self, call_id: str, wait_s: float | None = None) -> CallInfo:
        return self.call(get_call(call_id, wait_s))


class AsyncTasksMixin:
    """Tasks and calls for :class:`edgevisor.AsyncClient`."""

    if TYPE_CHECKING:

        async def call(self, call: Call[T]) -> T: ...

    async def deploy_task(self, source: Path | bytes, **options: Any) -> TaskInfo:
        data = source if isinstance(source, bytes) else pack_bundle(Path(source))
        return await self.call(deploy_task(data, **options))

    async def list_tasks(self) -> list[TaskInfo]:
        return await self.call(list_tasks())

    async def get_task(self, name: str, account: str | None = None) -> TaskInfo:
        return await self.call(get_task(name, account))

    async def remove_task(self, name: str, account: str | None = None) -> None:
        await self.call(remove_task(name, account))

    async def invoke(self, name: str, event: Any = None, **options: Any) -> CallInfo:
        return await self.call(invoke(name, event, **options))

    async def invoke_async(self, name: str, event: Any = None, **options: Any) -> CallAccepted:
        return await self.call(invoke_async(name, event, **options))

    async def get_call(self, call_id: str, wait_s: float | None = None) -> CallInfo:
        return await self.call(get_call(call_id, wait_s))

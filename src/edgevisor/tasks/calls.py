"""Call records: what the coordinator reports about one call of a task.

``CallRecord`` is the frozen, API-facing snapshot (it serialises to the JSON the API and
SDK return). Inside the coordinator a call in flight is a mutable :class:`CallState`; a
record is cut from it when someone asks and when the call ends.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from edgevisor.tasks.environment import EnvSpec, Outcome, OutcomeStatus
from edgevisor.tasks.spec import TaskSpec

__all__ = [
    "FINAL_STATUSES",
    "CallRecord",
    "CallState",
    "CallStatus",
    "TaskVersion",
    "new_call_id",
    "status_of",
]

CallStatus = Literal["queued", "running", "succeeded", "failed", "timeout", "oom", "crashed"]
FINAL_STATUSES: frozenset[str] = frozenset({"succeeded", "failed", "timeout", "oom", "crashed"})

_STATUS: dict[OutcomeStatus, CallStatus] = {
    "ok": "succeeded",
    "error": "failed",
    "timeout": "timeout",
    "oom": "oom",
    "crashed": "crashed",
}


def status_of(outcome_status: OutcomeStatus) -> CallStatus:
    return _STATUS[outcome_status]


def version_of(bundle: str, spec_json: str) -> str:
    """A task version's id: the same bundle with the same spec is the same version."""
    return hashlib.sha256(f"{bundle}\n{spec_json}".encode()).hexdigest()[:24]


def cap_logs(logs: str, cap: int) -> str:
    """At most ``cap`` bytes of a call's logs (UTF-8), marked when cut."""
    if len(logs) * 4 <= cap:  # no check needed: a character is at most 4 bytes
        return logs
    raw = logs.encode()
    if len(raw) <= cap:
        return logs
    return raw[:cap].decode(errors="ignore") + "\n[logs truncated]"


def settle(
    state: CallState, outcome: Outcome, start_s: float, *, log_cap_bytes: int, now: float
) -> str | None:
    """Write an environment's outcome into the call's state; return the result's JSON
    (None unless it succeeded). A result that is not JSON fails the call."""
    result_json: str | None = None
    status = status_of(outcome.status)
    error = outcome.error
    if status == "succeeded":
        try:
            result_json = json.dumps(outcome.result, separators=(",", ":"))
        except (TypeError, ValueError) as exc:
            status = "failed"
            error = {"type": "ResultNotSerializable", "message": f"result is not JSON: {exc}"}
    state.status = status
    state.result = outcome.result if result_json is not None else None
    state.error = error
    state.logs = cap_logs(outcome.logs, log_cap_bytes)
    state.init_s = outcome.init_s or start_s
    state.run_s = outcome.run_s
    state.finished_at = now
    return result_json


def new_call_id() -> str:
    """32 hex digits: the time in ms (12), then 80 random bits.

    Time first, so ids of later calls sort later and the journal's primary-key index grows
    at its end instead of at random pages (a random insert into a large index touches a
    page that is rarely cached; at thousands of calls a second that shows).
    """
    return f"{time.time_ns() // 1_000_000:012x}{os.urandom(10).hex()}"


class CallRecord(BaseModel):
    """One call: identity, status, payloads, timings (seconds) and logs."""

    model_config = ConfigDict(frozen=True)

    id: str = Field(..., description="Call id (hex).")
    task: str = Field(..., description="Task name.")
    version: str = Field(..., description="Task version the call ran on.")
    status: CallStatus = Field(..., description="queued|running|succeeded|failed|...")
    event: Any = Field(None, description="The call's input.")
    result: Any = Field(None, description="The handler's JSON result when succeeded.")
    error: dict[str, Any] | None = Field(None, description="type, message, traceback, ...")
    async_: bool = Field(False, description="Accepted asynchronously (returned an id).")
    idempotency_key: str | None = Field(None, description="Caller-supplied dedupe key.")
    priority: int = Field(0, description="Effective priority.")
    queue_wait_s: float | None = Field(None, description="Enqueue to dispatch.")
    init_s: float | None = Field(None, description="Environment start + handler load; 0 warm.")
    run_s: float | None = Field(None, description="Handler run time.")
    logs: str = Field("", description="stdout/stderr of the call, size-capped.")
    created_at: float = Field(..., description="Unix time the call was accepted.")
    started_at: float | None = Field(None, description="Unix time it was dispatched.")
    finished_at: float | None = Field(None, description="Unix time it ended.")

    @property
    def done(self) -> bool:
        return self.status in FINAL_STATUSES


class CallState:
    """A call in flight (mutable, cheap); ``record()`` cuts a :class:`CallRecord`."""

    __slots__ = (
        "async_",
        "created_at",
        "enqueued_mono",
        "error",
        "event",
        "event_json",
        "finished_at",
        "id",
        "idempotency_key",
        "init_s",
        "key",
        "logs",
        "priority",
        "queue_wait_s",
        "result",
        "run_s",
        "runner",
        "started_at",
        "status",
        "task",
        "version",
        "waiters",
    )

    def __init__(
        self,
        call_id: str,
        task: str,
        version: str,
        key: str,
        event: Any,
        *,
        async_: bool,
        idempotency_key: str | None,
        priority: int,
        created_at: float,
        enqueued_mono: float,
    ) -> None:
        self.id = call_id
        self.task = task
        self.version = version
        self.key = key
        self.event = event
        self.event_json: str | None = None  # encoded once at submission, reused by the journal
        self.async_ = async_
        self.idempotency_key = idempotency_key
        self.priority = priority
        self.created_at = created_at
        self.enqueued_mono = enqueued_mono
        self.status: CallStatus = "queued"
        self.result: Any = None
        self.error: dict[str, Any] | None = None
        self.logs = ""
        self.queue_wait_s: float | None = None
        self.init_s: float | None = None
        self.run_s: float | None = None
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.waiters: list[Any] = []  # asyncio futures resolved when the call ends
        # A sync caller waiting for its queued call: the coordinator resolves it with the
        # dispatch (env, call, fresh) so the caller runs the call itself (no task).
        self.runner: Any = None

    def record(self) -> CallRecord:
        # What ``CallRecord.model_construct(**fields)`` makes (every field set, no
        # validation), built directly: one is cut per call, and model_construct's generic
        # field walk costs ~4x as much. tests/unit/tasks pins the equality.
        rec = _new_record(CallRecord)
        _set(rec, "__dict__", {
            "id": self.id, "task": self.task, "version": self.version,
            "status": self.status, "event": self.event, "result": self.result,
            "error": self.error, "async_": self.async_,
            "idempotency_key": self.idempotency_key, "priority": self.priority,
            "queue_wait_s": self.queue_wait_s, "init_s": self.init_s, "run_s": self.run_s,
            "logs": self.logs, "created_at": self.created_at,
            "started_at": self.started_at, "finished_at": self.finished_at,
        })  # fmt: skip
        _set(rec, "__pydantic_fields_set__", set(_RECORD_FIELDS))  # model_copy mutates it
        _set(rec, "__pydantic_extra__", None)
        _set(rec, "__pydantic_private__", None)
        return rec


_RECORD_FIELDS: frozenset[str] = frozenset(CallRecord.model_fields)
_new_record = object.__new__
_set = object.__setattr__


class TaskVersion(BaseModel):
    """A deployed task: its name, version (bundle + spec digest) and spec."""

    model_config = ConfigDict(frozen=True)

    name: str
    version: str = Field(..., description="Digest of the bundle and the effective spec.")
    bundle: str = Field(..., description="Content digest of the bundle.")
    spec: TaskSpec = Field(..., description="The effective spec.")
    deployed_at: float = Field(..., description="Unix time of the deploy.")


def env_spec(tv: TaskVersion, bundles_root: Path) -> EnvSpec:
    """What an execution environment of a task version is made from."""
    s = tv.spec
    return EnvSpec(
        task=s.name, version=tv.bundle, bundle_dir=bundles_root / tv.bundle,
        runtime=s.runtime, handler=s.handler, memory_mb=s.memory_mb, cpu=s.cpu,
        timeout_s=s.timeout_s, env=dict(s.env), network=s.network,
    )  # fmt: skip

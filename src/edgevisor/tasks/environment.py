"""The contract between the coordinator and an execution environment.

The resource manager and scheduler (``tasks.scheduler``, ``tasks.resources``) decide
*which* environment runs a call; an :class:`EnvironmentFactory` (``tasks.sandbox``) makes
environments, isolated with namespaces + cgroups as root, plain subprocesses with rlimits
otherwise. One environment serves one task version and one call at a time; after a call it
is either reusable (warm) or not (``healthy`` is False and the caller closes it).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

Runtime = Literal["python", "command"]
OutcomeStatus = Literal["ok", "error", "timeout", "oom", "crashed"]


@dataclass(frozen=True)
class EnvSpec:
    """Everything needed to build an environment for one task version."""

    task: str
    version: str  # content hash of the bundle
    bundle_dir: Path  # unpacked bundle, mounted read-only inside
    runtime: Runtime
    handler: str  # "module:function" for python, argv[0] (relative to bundle) for command
    memory_mb: int
    cpu: float  # share of one core, e.g. 0.5
    timeout_s: float
    env: dict[str, str] = field(default_factory=dict)
    network: Literal["none", "host"] = "none"
    pids_max: int = 64
    tmp_mb: int = 64


@dataclass(frozen=True)
class Outcome:
    """What one call produced. ``error`` is set unless status == "ok"."""

    status: OutcomeStatus
    result: Any = None
    error: dict[str, Any] | None = None  # {"type", "message", "traceback"?, "signal"?, "limit_mb"?}
    logs: str = ""  # stdout/stderr of the call, size-capped
    init_s: float = 0.0  # environment start + handler load, 0 when warm
    run_s: float = 0.0


# A handler calling another task through ``context.invoke(task, event, async_=False)``:
# the environment forwards it to the coordinator through this callback.
SubcallFn = Callable[[str, Any, bool], Awaitable[Any]]


class Environment(Protocol):
    spec: EnvSpec

    @property
    def healthy(self) -> bool:
        """True when the environment can take another call (warm reuse)."""
        ...

    async def start(self) -> float:
        """Create the environment and load the handler; return the seconds it took."""
        ...

    async def invoke(
        self, event: Any, context: dict[str, Any], subcall: SubcallFn | None = None
    ) -> Outcome:
        """Run one call; enforces ``spec.timeout_s`` (kills the environment on timeout)."""
        ...

    async def close(self) -> None:
        """Kill every process of the environment and remove its cgroups, mounts, dirs."""
        ...


class EnvironmentFactory(Protocol):
    isolated: bool  # False when running without root: no namespaces or cgroups

    def create(self, spec: EnvSpec) -> Environment: ...

"""How a sandboxed runtime is configured: settings, start errors, config, staged files.

The ``sandbox`` settings section, the two errors of starting an environment (a handler
that does not load is the caller's; an environment that does not start is the host's),
the config and environment variables a runtime is launched with (the same for both
kinds), and the runtime files staged once per factory. Re-exported by :mod:`.sandbox`.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from edgevisor.errors import RequestError, UnavailableError
from edgevisor.tasks import runtime as rt
from edgevisor.tasks.environment import EnvSpec

__all__ = ["EnvironmentStartError", "HandlerLoadError", "SandboxSettings"]


class SandboxSettings(BaseModel):
    """Settings of the execution-environment factories (section ``sandbox``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    uid: int = Field(65534, description="Unprivileged uid a task runs as in isolated mode.")
    gid: int = Field(65534, description="Unprivileged gid a task runs as in isolated mode.")
    log_cap_bytes: int = Field(
        64 * 1024, gt=0, description="Captured stdout+stderr kept per call; the rest is cut."
    )
    max_frame_bytes: int = Field(
        8 * 1024 * 1024,
        gt=1024,
        description="Largest protocol frame (event, result, log) between agent and runtime.",
    )
    start_timeout_s: float = Field(
        30.0, gt=0, description="How long a new environment may take to load its handler."
    )
    stem_memory_mb: int = Field(
        64, gt=8, description="Memory limit of a prewarmed sandbox before it gets a task."
    )
    runtime_dir: Path | None = Field(
        None, description="Where the runtime files are staged; a private temp dir if unset."
    )


class HandlerLoadError(RequestError):
    """The bundle's handler could not be loaded (import error, missing function, ...)."""

    code = "handler_load_failed"


class EnvironmentStartError(UnavailableError):
    """The environment itself could not be started (sandbox tool, cgroups, no Ready)."""

    code = "environment_start_failed"


def _runtime_config(
    spec: EnvSpec,
    settings: SandboxSettings,
    bundle: str,
    rlimits: dict[str, int] | None = None,
    stem: bool = False,
) -> dict[str, Any]:
    return {
        "bundle": bundle,
        "runtime": spec.runtime,
        "handler": spec.handler,
        "log_cap_bytes": settings.log_cap_bytes,
        "max_frame_bytes": settings.max_frame_bytes,
        "rlimits": rlimits or {},
        "stem": stem,
    }


def _base_env(spec: EnvSpec, home: str) -> dict[str, str]:
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": home,
        "LANG": "C.UTF-8",
        "TMPDIR": "/tmp",
        **spec.env,
    }


class _RuntimeFiles:
    """The staged runtime directory, made once per factory and removed with it."""

    def __init__(self, settings: SandboxSettings) -> None:
        self._own = settings.runtime_dir is None
        base = settings.runtime_dir or Path(tempfile.mkdtemp(prefix="edgevisor-runtime-"))
        self.path = rt.prepare_runtime_dir(base)

    def remove(self) -> None:
        if self._own:
            shutil.rmtree(self.path, ignore_errors=True)

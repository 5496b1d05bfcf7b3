"""The plain environment: a subprocess in its own session with rlimits (no root needed).

No namespaces, no cgroups, no uid switch: memory is bounded by ``RLIMIT_DATA`` (a refused
allocation is reported as an OOM), CPU time by ``RLIMIT_CPU`` per call, processes by
``RLIMIT_NPROC``. What a user loses against the isolated kind is spelled out by
:func:`plain_isolation_warning`. Re-exported by :mod:`.sandbox`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
from typing import Any

from edgevisor.tasks import runtime as rt
from edgevisor.tasks.environment import Environment, EnvSpec, Outcome
from edgevisor.tasks.sandbox_config import (
    EnvironmentStartError,
    SandboxSettings,
    _base_env,
    _runtime_config,
    _RuntimeFiles,
)
from edgevisor.tasks.sandbox_process import _crashed, _ProcessEnvironment

__all__ = ["PlainEnvironment", "PlainFactory", "plain_isolation_warning"]


def plain_isolation_warning() -> str:
    """What a user loses when environments run without root (printed at agent start)."""
    return (
        "edgevisor is not running as root (or bubblewrap / cgroup v1 are missing): tasks run "
        "as plain subprocesses of the agent, as the agent's user. Missing isolation: no pid, "
        "mount, network, ipc or uts namespaces (a task sees the host's processes, files and "
        "network, and can read whatever the agent's user can read, including the agent's data "
        "dir); no cgroups (memory is limited by RLIMIT_DATA per process only, CPU time by "
        "RLIMIT_CPU per call, processes by RLIMIT_NPROC across the whole user; no CPU share); "
        "no uid switch and no private /tmp. Run the agent as root for isolated environments."
    )


class PlainEnvironment(_ProcessEnvironment):
    """A subprocess in its own session with rlimits; no namespaces, no cgroups."""

    async def _spawn(self) -> None:
        spec = self.spec
        rlimits = {"RLIMIT_DATA": spec.memory_mb * 1024 * 1024}
        if os.geteuid() != 0:  # per user: room for this task's processes on top of the rest
            rlimits["RLIMIT_NPROC"] = _user_process_count() + spec.pids_max
        config = _runtime_config(spec, self._settings, str(spec.bundle_dir), rlimits)
        config["cpu_guard_s"] = int(spec.timeout_s) + 1
        to_rt_r, to_rt_w = os.pipe()
        from_rt_r, from_rt_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            proc = subprocess.Popen(
                rt.launch_argv(str(self._runtime_dir), config),
                stdin=to_rt_r,
                stdout=from_rt_w,
                stderr=err_w,
                start_new_session=True,
                env=_base_env(spec, tempfile.gettempdir()),
                close_fds=True,
            )
        except OSError as exc:
            for fd in (to_rt_r, to_rt_w, from_rt_r, from_rt_w, err_r, err_w):
                os.close(fd)
            raise EnvironmentStartError(f"cannot start the runtime: {exc}") from exc
        for fd in (to_rt_r, from_rt_w, err_w):
            os.close(fd)
        self._attach(proc, from_rt_r, to_rt_w, err_r)

    async def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._proc.pid, signal.SIGKILL)
        if self._state != "closed":
            self._state = "dead"

    def _classify_death(self, status: int | None) -> tuple[str, dict[str, Any]]:
        # Popen reports a child killed by signal N as -N.
        return _crashed(status, -status if status is not None and status < 0 else None)

    def _error_outcome(
        self, error: dict[str, Any], logs: str, init_s: float, run_s: float
    ) -> Outcome:
        if error.get("type") == "MemoryError":
            # RLIMIT_DATA refused an allocation: the plain form of an OOM kill. The heap may
            # be in any state now, so the environment is not reused.
            self._state = "dead"
            return Outcome(
                "oom",
                error={
                    **error,
                    "type": "MemoryLimitExceeded",
                    "message": f"memory limit exceeded ({self.spec.memory_mb} MB)",
                    "limit_mb": self.spec.memory_mb,
                },
                logs=logs,
                init_s=init_s,
                run_s=run_s,
            )
        return super()._error_outcome(error, logs, init_s, run_s)


def _user_process_count() -> int:
    uid = os.getuid()
    count = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if entry.stat().st_uid == uid:
                    count += 1
    return count


class PlainFactory:
    """Environments as plain subprocesses with rlimits (no root needed)."""

    isolated = False

    def __init__(self, settings: SandboxSettings | None = None) -> None:
        self.settings = settings or SandboxSettings()
        self._files = _RuntimeFiles(self.settings)

    def create(self, spec: EnvSpec) -> Environment:
        return PlainEnvironment(spec, self.settings, self._files.path)

    def close(self) -> None:
        self._files.remove()

"""Execution environments: isolated (bubblewrap + cgroup v1, as root) and plain (rlimits).

Both kinds run the same runtime (``tasks/runtime/evruntime.py``) and speak the same framed
protocol (``proto/runtime.py``) over two inherited pipes; they differ in how the process is
started, limited, killed, and how its death is explained. This module holds the factories
and the choice between them; the parts are, by concept:

- :mod:`.sandbox_config`: settings, start errors, the runtime's config and staged files;
- :mod:`.sandbox_io`: non-blocking pipe I/O on the loop and the per-environment call timer;
- :mod:`.sandbox_process`: the process environment both kinds share (its state machine:
  start, invoke, timeouts, outcomes, close), with its theory of operation;
- :mod:`.sandbox_plain`: the plain kind; :mod:`.isolation`: the isolated kind.

Every name other modules and tests import from here stays importable from here (the
private helpers too: :mod:`.isolation` and the tests import them from this module).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from edgevisor.tasks.cgroups import cgroups_available
from edgevisor.tasks.environment import EnvSpec
from edgevisor.tasks.sandbox_config import (
    EnvironmentStartError,
    HandlerLoadError,
    SandboxSettings,
    _RuntimeFiles,
)
from edgevisor.tasks.sandbox_config import _base_env as _base_env
from edgevisor.tasks.sandbox_config import _runtime_config as _runtime_config
from edgevisor.tasks.sandbox_io import _CallTimer as _CallTimer
from edgevisor.tasks.sandbox_io import _set_nonblocking as _set_nonblocking
from edgevisor.tasks.sandbox_plain import (
    PlainEnvironment,
    PlainFactory,
    plain_isolation_warning,
)
from edgevisor.tasks.sandbox_process import _names as _names
from edgevisor.tasks.sandbox_process import _ProcessEnvironment as _ProcessEnvironment
from edgevisor.tasks.sandbox_process import _signal_name as _signal_name

if TYPE_CHECKING:
    from edgevisor.tasks.isolation import IsolatedEnvironment, StemPool

__all__ = [
    "EnvironmentStartError",
    "HandlerLoadError",
    "IsolatedFactory",
    "PlainEnvironment",
    "PlainFactory",
    "SandboxSettings",
    "default_factory",
    "isolation_available",
    "plain_isolation_warning",
]


class IsolatedFactory:
    """Environments in namespaces + cgroups. Needs root, ``bwrap`` and cgroup v1."""

    isolated = True

    def __init__(self, settings: SandboxSettings | None = None) -> None:
        # isolation.py builds on this module's base class: import it when first needed.
        from edgevisor.tasks.isolation import StemPool

        self.settings = settings or SandboxSettings()
        reason = isolation_unavailable_reason()
        if reason:
            raise EnvironmentStartError(f"isolated environments unavailable: {reason}")
        self._files = _RuntimeFiles(self.settings)
        self._stage_root = Path(tempfile.mkdtemp(prefix="edgevisor-stems-"))
        self._stage_root.chmod(0o711)
        self.pool: StemPool = StemPool(self.settings, self._files.path, self._stage_root)

    def create(self, spec: EnvSpec) -> IsolatedEnvironment:
        from edgevisor.tasks.isolation import IsolatedEnvironment

        return IsolatedEnvironment(spec, self.settings, self._files.path, self.pool)

    async def prewarm(self, count: int, network: str = "none", tmp_mb: int = 64) -> None:
        """Keep ``count`` prewarmed sandboxes of this network mode and /tmp size ready."""
        await self.pool.fill(count, network, tmp_mb)

    async def aclose(self) -> None:
        """Close the prewarmed sandboxes, then remove the staged files."""
        await self.pool.aclose()
        self.close()

    def close(self) -> None:
        """Remove the staged runtime files (environments must be closed first)."""
        self._files.remove()
        shutil.rmtree(self._stage_root, ignore_errors=True)


def isolation_unavailable_reason() -> str | None:
    """Why isolated environments cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "not running as root"
    if shutil.which("bwrap") is None:
        return "bubblewrap (bwrap) is not installed"
    if not os.path.exists("/usr/bin/setpriv"):
        return "setpriv (util-linux) is not installed"
    if not cgroups_available():
        return "cgroup v1 memory/pids/cpu/freezer hierarchies are not mounted writable"
    return None


def isolation_available() -> bool:
    return isolation_unavailable_reason() is None


def default_factory(settings: SandboxSettings | None = None) -> IsolatedFactory | PlainFactory:
    """Isolated when possible; otherwise plain (log :func:`plain_isolation_warning`)."""
    if isolation_available():
        return IsolatedFactory(settings)
    return PlainFactory(settings)

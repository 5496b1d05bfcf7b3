"""The pure parts of a domain: its spec, settings, names, restart policy and sandbox argv.

Nothing here does I/O; :mod:`edgevisor.migration.domain` performs what these decide.

Names: every kernel object of a domain (network namespace, cgroups, veth) is named from a
short hash of ``(host, qualified domain name)`` under a per-host tag, so several simulated
hosts on one machine never collide, and an agent can find (and clear) exactly the objects
its own previous run left behind without touching another host's.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from edgevisor.errors import RequestError
from edgevisor.migration.domain_config import DomainsSettings
from edgevisor.tasks.environment import EnvSpec
from edgevisor.tasks.isolation import bwrap_argv

__all__ = [
    "DOMAIN_NAME_RE",
    "DomainSpec",
    "DomainsSettings",
    "RestartPolicy",
    "SavedState",
    "StepClock",
    "cgroup_parent",
    "domain_argv",
    "domain_tag",
    "host_tag",
    "netns_name",
    "restart_delay",
    "slot_address",
    "validate_name",
]

RestartPolicy = Literal["never", "on-failure", "always"]
DOMAIN_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$")
CGROUP_PARENT = "edgevisor-domains"
APP_MOUNT = "/task"  # the domain's read-only app files (bwrap_argv's bundle mount)


class DomainSpec(BaseModel):
    """What a domain is; the agent keeps it as ``spec.json`` in the domain's directory."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    account: str
    name: str
    command: tuple[str, ...] = Field(min_length=1)
    volume: str = Field(description="Name of the domain's volume in its account.")
    volume_size_bytes: int = Field(gt=0)
    restart: RestartPolicy = "on-failure"
    memory_mb: int = Field(256, gt=8)
    cpu: float = Field(1.0, ge=0)
    pids_max: int = Field(256, gt=1)
    env: dict[str, str] = Field(default_factory=dict)

    @property
    def qualified(self) -> str:
        return f"{self.account}.{self.name}"

    @property
    def volume_id(self) -> str:
        """The volume's id on the host (what the ``volumes`` capability is called with)."""
        return f"{self.account}.{self.volume}"


class StepClock:
    """Per-step durations of one operation (a start, a quiesce): ``mark(step)`` records
    the seconds since the previous mark; ``steps`` keeps them in order, plus ``total``.

    Steps that run concurrently are timed with ``since(t0, step)`` from a common start.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.t0 = self._last = clock()
        self.steps: dict[str, float] = {}

    def now(self) -> float:
        return self._clock()

    def mark(self, step: str) -> None:
        now = self._clock()
        self.steps[step] = now - self._last
        self._last = now

    def since(self, t0: float, step: str) -> None:
        """Record ``step`` as the time from ``t0`` (one branch of concurrent steps)."""
        self.steps[step] = self._clock() - t0

    def skip(self) -> None:
        """The next ``mark`` counts from now (after concurrent steps timed by ``since``)."""
        self._last = self._clock()

    def done(self) -> dict[str, float]:
        self.steps["total"] = self._clock() - self.t0
        return dict(self.steps)


def validate_name(kind: str, name: str) -> str:
    if not DOMAIN_NAME_RE.match(name):
        raise RequestError(
            f"{kind} name {name!r} must be 1-40 characters of a-z, 0-9 and '-', "
            "starting and ending with a letter or digit"
        )
    return name


def _hash(text: str, size: int) -> str:
    return hashlib.blake2b(text.encode(), digest_size=size).hexdigest()


def host_tag(host: str) -> str:
    return _hash(f"host\0{host}", 4)


def domain_tag(host: str, qualified: str) -> str:
    return _hash(f"domain\0{host}\0{qualified}", 5)


def netns_name(host: str, qualified: str) -> str:
    return f"evd-{host_tag(host)}-{domain_tag(host, qualified)}"


def netns_prefix(host: str) -> str:
    return f"evd-{host_tag(host)}-"


def cgroup_parent(host: str) -> str:
    """Relative path under each controller that holds this host's domain groups."""
    return f"{CGROUP_PARENT}/{host_tag(host)}"


def slot_address(subnet: str, slot: int) -> ipaddress.IPv4Address:
    """The ``slot``-th usable address of ``subnet`` (its network address is skipped)."""
    net = ipaddress.IPv4Network(subnet)
    if slot < 0 or slot + 1 >= net.num_addresses - 1:
        raise RequestError(f"no test address left in {subnet} (slot {slot})")
    return net.network_address + slot + 1


def restart_delay(
    policy: RestartPolicy, exit_status: int | None, failures: int, s: DomainsSettings
) -> float | None:
    """Seconds to wait before restarting an exited domain, or None to leave it down.

    ``failures`` counts the consecutive restarts since the last run that lasted at least
    ``backoff_reset_s``; the delay doubles with each one up to ``backoff_max_s``.
    """
    if policy == "never":
        return None
    if policy == "on-failure" and exit_status == 0:
        return None
    if s.max_restarts and failures >= s.max_restarts:
        return None
    return float(min(s.backoff_initial_s * (2 ** min(failures, 30)), s.backoff_max_s))


def domain_argv(
    spec: DomainSpec,
    *,
    app_dir: Path,
    empty_dir: Path,
    volume_dir: Path,
    settings: DomainsSettings,
    uid: int,
    gid: int,
    block_fd: int,
    info_fd: int,
) -> list[str]:
    """bwrap argv for a domain: the task sandbox layout plus the volume, bound read-write.

    The task layout is reused as is (``bwrap_argv``): read-only system dirs and the
    interpreter, the app at ``/task`` (the working directory), a private ``/tmp``, fresh
    ``/proc`` and ``/dev``, pid/mount/ipc/uts/cgroup namespaces, every capability dropped
    and the unprivileged uid. ``network="host"`` here means "do not unshare again": the
    caller starts bwrap inside the domain's own network namespace.
    """
    env_spec = EnvSpec(
        task=spec.qualified,
        version="",
        bundle_dir=app_dir,
        runtime="command",
        handler="",
        memory_mb=spec.memory_mb,
        cpu=spec.cpu,
        timeout_s=0,
        network="host",
        pids_max=spec.pids_max,
        tmp_mb=settings.tmp_mb,
    )
    argv = bwrap_argv(
        env_spec,
        runtime_dir=empty_dir,
        command=list(spec.command),
        uid=uid,
        gid=gid,
        block_fd=block_fd,
        info_fd=info_fd,
    )
    cut = argv.index("--")
    extra = ["--bind", str(volume_dir), settings.volume_mount]
    return [*argv[:cut], *extra, *argv[cut:]]


def domain_env(spec: DomainSpec, settings: DomainsSettings, address: str | None) -> dict[str, str]:
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": "/tmp",
        "LANG": "C.UTF-8",
        "TMPDIR": "/tmp",
        "EDGEVISOR_DOMAIN": spec.name,
        "EDGEVISOR_DATA": settings.volume_mount,
    }
    if address:
        env["EDGEVISOR_ADDRESS"] = address
    env.update(spec.env)
    return env


def command_of(parts: Sequence[str]) -> tuple[str, ...]:
    out = tuple(parts)
    if not out or not out[0]:
        raise RequestError("a domain needs a command")
    return out


@dataclass
class SavedState:
    """``state.json``: what a later agent run needs to find and clear this domain's objects."""

    slot: int
    desired: str = "stopped"  # running | stopped
    restarts: int = 0

    @classmethod
    def load(cls, path: Path) -> SavedState | None:
        try:
            raw = json.loads(path.read_text())
            return cls(int(raw["slot"]), str(raw.get("desired", "stopped")), int(raw["restarts"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.__dict__))
        os.replace(tmp, path)

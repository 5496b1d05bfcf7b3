"""Isolated environments: the bubblewrap sandbox, its cgroups, and prewarmed "stems".

:func:`bwrap_argv` is pure: from an :class:`~edgevisor.tasks.environment.EnvSpec` and a few
host paths to an argv. :class:`IsolatedEnvironment` starts it inside cgroup v1 limits and
explains deaths from the cgroup (OOM) or bwrap's exit status (signal); :class:`StemPool`
keeps prewarmed sandboxes that a task takes over in a few milliseconds.

The choice of tools, measured on this host (median of 10, see ``bench/coordinator``):
``bwrap`` + ``setpriv`` + ``python -I -S -c pass`` ~14-20 ms against ~8-12 ms for the bare
interpreter; ``unshare(1)`` costs more (26-52 ms) and Python 3.11 has no ``os.unshare``.

Layout inside (a fresh tmpfs root, so nothing of the host is visible unless listed)::

    /usr /bin /lib /lib64 ...   read-only binds (or the host's symlinks) for libc and setpriv
    <python prefix>             read-only bind of the interpreter's installation
    /task                       the bundle, read-only; the working directory
    /.edgevisor                 the runtime (one self-contained module), read-only
    /tmp                        private tmpfs of ``spec.tmp_mb``, mode 1777
    /proc /dev                  a fresh procfs of the new pid namespace; a minimal /dev

Namespaces: pid, mount, ipc, uts, cgroup, and net unless ``spec.network == "host"`` (then
the host's network and its resolver files). No user namespace: bwrap runs as real root,
keeps only CAP_SETUID/SETGID/SETPCAP for ``setpriv``, which switches to the unprivileged
uid, empties the bounding and inheritable sets and sets no_new_privs before exec'ing Python.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgevisor.errors import EdgevisorError
from edgevisor.proto import runtime as proto
from edgevisor.tasks import runtime as rt
from edgevisor.tasks.cgroups import CgroupLimits, CgroupSet
from edgevisor.tasks.environment import EnvSpec
from edgevisor.tasks.sandbox import (
    EnvironmentStartError,
    SandboxSettings,
    _base_env,
    _names,
    _ProcessEnvironment,
    _runtime_config,
)
from edgevisor.tasks.sandbox_io import bwrap_child_pid
from edgevisor.tasks.sandbox_process import _crashed

__all__ = [
    "BUNDLE_MOUNT",
    "RUNTIME_MOUNT",
    "IsolatedEnvironment",
    "StemPool",
    "bwrap_argv",
    "hostname_for",
    "python_prefix",
    "setpriv_argv",
]

BUNDLE_MOUNT = "/task"
RUNTIME_MOUNT = "/.edgevisor"
_SYSTEM_DIRS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_NET_FILES = (
    "/etc/resolv.conf",
    "/etc/hosts",
    "/etc/nsswitch.conf",
    "/etc/ssl",
    "/etc/ca-certificates",
)


def python_prefix() -> Path:
    """The interpreter's installation directory (what must be visible inside)."""
    return Path(os.path.realpath(sys.base_prefix))


def hostname_for(task: str) -> str:
    return ("ev-" + re.sub(r"[^a-zA-Z0-9-]", "-", task))[:63]


def setpriv_argv(uid: int, gid: int, setpriv: str = "/usr/bin/setpriv") -> list[str]:
    return [
        setpriv,
        f"--reuid={uid}",
        f"--regid={gid}",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
        "--no-new-privs",
        "--",
    ]


def _dirs_for(path: Path) -> list[str]:
    """``--dir`` every ancestor with mode 0755: bwrap would copy e.g. /root's 0700."""
    args: list[str] = []
    for parent in reversed(path.parents):
        if str(parent) in ("/", "/usr"):
            continue
        args += ["--perms", "0755", "--dir", str(parent)]
    return args


def bwrap_argv(
    spec: EnvSpec,
    *,
    runtime_dir: Path,
    command: Sequence[str],
    uid: int,
    gid: int,
    block_fd: int | None = None,
    info_fd: int | None = None,
    prefix: Path | None = None,
    bwrap: str = "bwrap",
) -> list[str]:
    """The full argv: bwrap, then setpriv, then ``command`` (run inside, as ``uid``)."""
    prefix = prefix or python_prefix()
    args = [
        bwrap,
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--die-with-parent",
        "--new-session",
        "--hostname",
        hostname_for(spec.task),
        "--ro-bind",
        "/usr",
        "/usr",
    ]
    if spec.network != "host":
        args.append("--unshare-net")
    for d in _SYSTEM_DIRS:
        if os.path.islink(d):
            args += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            args += ["--ro-bind", d, d]
    if not (prefix == Path("/usr") or Path("/usr") in prefix.parents):
        args += [*_dirs_for(prefix), "--ro-bind", str(prefix), str(prefix)]
    if spec.network == "host":
        for f in _NET_FILES:
            if os.path.exists(f):
                args += ["--ro-bind", f, f]
    args += [
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--perms",
        "1777",
        "--size",
        str(spec.tmp_mb * 1024 * 1024),
        "--tmpfs",
        "/tmp",
        "--ro-bind",
        str(spec.bundle_dir),
        BUNDLE_MOUNT,
        "--ro-bind",
        str(runtime_dir),
        RUNTIME_MOUNT,
        "--chdir",
        BUNDLE_MOUNT,
        "--cap-drop",
        "ALL",
        "--cap-add",
        "CAP_SETUID",
        "--cap-add",
        "CAP_SETGID",
        "--cap-add",
        "CAP_SETPCAP",
    ]
    if block_fd is not None:
        args += ["--block-fd", str(block_fd)]
    if info_fd is not None:
        args += ["--info-fd", str(info_fd)]
    return [*args, "--", *setpriv_argv(uid, gid), *command]


# -- the environment ---------------------------------------------------------------


class IsolatedEnvironment(_ProcessEnvironment):
    """bubblewrap namespaces + cgroup v1 limits (layout: see the module docstring)."""

    isolated = True

    def __init__(
        self,
        spec: EnvSpec,
        settings: SandboxSettings,
        runtime_dir: Path,
        pool: StemPool | None = None,
        *,
        stem: bool = False,
    ) -> None:
        super().__init__(spec, settings, runtime_dir)
        safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in spec.task)[:40]
        self.cgroup_name = f"{safe}-{os.getpid()}-{next(_names)}-{secrets.token_hex(3)}"
        self._cg = CgroupSet(self.cgroup_name)
        self._cg_created = False
        self._pool = pool
        self._stem = stem  # started without a handler; spec.bundle_dir is its staging dir
        self._stage_dir: Path | None = spec.bundle_dir if stem else None
        self.from_stem = False  # True when this environment took over a prewarmed one

    async def start(self) -> float:
        stem = self._pool.take(self.spec) if self._pool is not None else None
        if stem is None:
            return await super().start()
        return await self._start_from_stem(stem)

    async def _start_from_stem(self, stem: IsolatedEnvironment) -> float:
        """Give a prewarmed sandbox this task: stage the bundle, set limits, Load."""
        if self._state != "new":
            raise RuntimeError(f"environment already {self._state}")
        t0 = time.perf_counter()
        self._adopt(stem)
        spec = self.spec
        try:
            assert self._stage_dir is not None
            await asyncio.to_thread(_stage_bundle, spec.bundle_dir, self._stage_dir)
            self._cg.set_limits(CgroupLimits(spec.memory_mb, spec.pids_max, spec.cpu))
            await self._write(
                self._conn.send(
                    proto.Load(spec.runtime, spec.handler, BUNDLE_MOUNT, dict(spec.env))
                )
            )
            await self._await_ready()
        except proto.RemoteProtocolError as exc:
            await self.close()
            raise EnvironmentStartError(f"task {spec.task!r}: runtime: {exc}") from exc
        except BaseException:
            await self.close()
            raise
        self._state = "warm"
        self._init_s = time.perf_counter() - t0
        return self._init_s

    def _adopt(self, stem: IsolatedEnvironment) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(stem._rfd)
        self._proc, self._rfd, self._wfd, self._errfd = (
            stem._proc,
            stem._rfd,
            stem._wfd,
            stem._errfd,
        )
        self._conn, self._eof = stem._conn, stem._eof
        self._cg, self._cg_created, self.cgroup_name = stem._cg, stem._cg_created, stem.cgroup_name
        self._stage_dir = stem._stage_dir
        stem._state, stem._cg_created, stem._stage_dir = "closed", False, None
        stem._rfd = stem._wfd = stem._errfd = -1
        stem._proc = None
        self._state = "starting"
        self.from_stem = True
        if not self._eof:
            loop.add_reader(self._rfd, self._on_readable)

    async def _spawn(self) -> None:
        spec = self.spec
        self._cg.create(CgroupLimits(spec.memory_mb, spec.pids_max, spec.cpu))
        self._cg_created = True
        config = _runtime_config(spec, self._settings, BUNDLE_MOUNT, stem=self._stem)
        to_rt_r, to_rt_w = os.pipe()
        from_rt_r, from_rt_w = os.pipe()
        err_r, err_w = os.pipe()
        block_r, block_w = os.pipe()
        info_r, info_w = os.pipe()
        argv = bwrap_argv(
            spec,
            runtime_dir=self._runtime_dir,
            uid=self._settings.uid,
            gid=self._settings.gid,
            command=rt.launch_argv(RUNTIME_MOUNT, config),
            block_fd=block_r,
            info_fd=info_w,
        )
        try:
            proc = subprocess.Popen(
                argv,
                stdin=to_rt_r,
                stdout=from_rt_w,
                stderr=err_w,
                pass_fds=(block_r, info_w),
                env=_base_env(spec, "/tmp"),
                close_fds=True,
            )
        except OSError as exc:
            for fd in (
                to_rt_r,
                to_rt_w,
                from_rt_r,
                from_rt_w,
                err_r,
                err_w,
                block_r,
                block_w,
                info_r,
                info_w,
            ):
                os.close(fd)
            raise EnvironmentStartError(f"cannot start bwrap: {exc}") from exc
        for fd in (to_rt_r, from_rt_w, err_w, block_r, info_w):
            os.close(fd)
        self._attach(proc, from_rt_r, to_rt_w, err_r)
        try:
            async with asyncio.timeout(self._settings.start_timeout_s):
                child = await bwrap_child_pid(info_r)
            if child is None:
                raise EnvironmentStartError(
                    f"bwrap did not start: {await self._startup_stderr() or 'no child pid'}"
                )
            # The namespace's init is blocked on block_fd: it forks the runtime only after
            # it sits in the cgroups, so every process of the task is limited from birth.
            self._cg.add(child)
            os.write(block_w, b"1")
        finally:
            os.close(info_r)
            os.close(block_w)

    async def _kill(self) -> None:
        if self._cg_created:
            await asyncio.to_thread(self._cg.kill_all)
            # Reap our own child (bwrap) at once: the cgroup is empty as soon as its
            # processes exit, but a killed environment must not leave a zombie behind.
            await self._wait_exit(2.0)
        if self._state not in ("closed",):
            self._state = "dead"

    async def _cleanup(self) -> None:
        if self._cg_created:
            await asyncio.to_thread(self._cg.remove)
            self._cg_created = False
        if self._stage_dir is not None:
            await asyncio.to_thread(shutil.rmtree, self._stage_dir, True)
            self._stage_dir = None

    def _classify_death(self, status: int | None) -> tuple[str, dict[str, Any]]:
        oom = self._cg.oom()
        if oom.oom_killed:
            return "oom", {
                "type": "MemoryLimitExceeded",
                "message": f"memory limit exceeded ({self.spec.memory_mb} MB)",
                "limit_mb": self.spec.memory_mb,
            }
        # bwrap reports a child killed by signal N as exit status 128 + N.
        return _crashed(status, status - 128 if status is not None and status > 128 else None)


def _stage_bundle(bundle: Path, stage: Path) -> None:
    """Make the bundle's files appear in a prewarmed sandbox's /task (hard links if we can)."""

    def link_or_copy(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(bundle, stage, dirs_exist_ok=True, copy_function=link_or_copy, symlinks=True)


class StemPool:
    """Prewarmed isolated environments ("stem cells"): sandbox and runtime up, no task yet.

    A stem is keyed by what cannot change after its sandbox exists: the network mode and the
    size of /tmp. Its /task is a bind of an empty staging directory on the host; taking it
    hard-links the bundle there, writes the task's cgroup limits, and sends ``Load``, so the
    cold start of a prewarmed environment is one handler import. Each take starts a
    replacement in the background, keeping the pool at its target.
    """

    def __init__(self, settings: SandboxSettings, runtime_dir: Path, stage_root: Path) -> None:
        self._settings = settings
        self._runtime_dir = runtime_dir
        self._stage_root = stage_root
        self._stems: dict[tuple[str, int], list[IsolatedEnvironment]] = {}
        self._target: dict[tuple[str, int], int] = {}
        self._refills: set[asyncio.Task[None]] = set()
        self._closed = False

    def size(self, network: str = "none", tmp_mb: int = 64) -> int:
        return len(self._stems.get((network, tmp_mb), []))

    async def fill(self, count: int, network: str = "none", tmp_mb: int = 64) -> None:
        """Keep ``count`` stems of this kind ready; start the missing ones now."""
        key = (network, tmp_mb)
        self._target[key] = count
        while len(self._stems.get(key, [])) < count and not self._closed:
            await self._add(key)

    def take(self, spec: EnvSpec) -> IsolatedEnvironment | None:
        key = (spec.network, spec.tmp_mb)
        stems = self._stems.get(key)
        while stems:
            stem = stems.pop()
            if stem.healthy:
                if not self._closed:
                    task = asyncio.get_running_loop().create_task(self._refill(key))
                    self._refills.add(task)
                    task.add_done_callback(self._refills.discard)
                return stem
            self._dispose(stem)
        return None

    async def aclose(self) -> None:
        self._closed = True
        for task in list(self._refills):
            task.cancel()
        await asyncio.gather(*self._refills, return_exceptions=True)
        stems = [s for group in self._stems.values() for s in group]
        self._stems.clear()
        for stem in stems:
            await stem.close()

    async def _add(self, key: tuple[str, int]) -> None:
        network, tmp_mb = key
        stage = Path(tempfile.mkdtemp(prefix="stem-", dir=self._stage_root))
        stage.chmod(0o755)
        spec = EnvSpec(
            task="stem",
            version="",
            bundle_dir=stage,
            runtime="python",
            handler="",
            memory_mb=self._settings.stem_memory_mb,
            cpu=0,
            timeout_s=0,
            network=network,  # type: ignore[arg-type]
            tmp_mb=tmp_mb,
        )
        stem = IsolatedEnvironment(spec, self._settings, self._runtime_dir, stem=True)
        await stem.start()
        if self._closed:
            await stem.close()
            return
        self._stems.setdefault(key, []).append(stem)

    async def _refill(self, key: tuple[str, int]) -> None:
        with contextlib.suppress(EdgevisorError):
            while len(self._stems.get(key, [])) < self._target.get(key, 0) and not self._closed:
                await self._add(key)

    def _dispose(self, stem: IsolatedEnvironment) -> None:
        task = asyncio.get_running_loop().create_task(stem.close())
        self._refills.add(task)
        task.add_done_callback(self._refills.discard)

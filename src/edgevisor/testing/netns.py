"""Thin helpers over iproute2 and process groups, used by the test topology.

Everything here shells out to ``ip`` (iproute2): it is always present on the hosts we run
on, it needs no threads (``setns`` in a ``preexec_fn`` is unsafe in a threaded parent) and
``ip netns exec`` execs the target program, so the PID we get back is the program's own.
Each helper is idempotent where teardown needs it to be (deleting something already gone
is not an error), because teardown must finish even after a half-built setup.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence

from edgevisor.errors import EdgevisorError

__all__ = [
    "IP",
    "TopologyError",
    "blocked_signals",
    "ip",
    "kill_group",
    "link_delete",
    "link_names",
    "netns_add",
    "netns_delete",
    "netns_exec_argv",
    "netns_list",
    "netns_pids",
]

IP = shutil.which("ip") or "/usr/sbin/ip"


class TopologyError(EdgevisorError):
    """Building or tearing down the simulated network failed (the message has ``ip``'s words)."""


def ip(*args: str, netns: str | None = None, check: bool = True) -> str:
    """Run ``ip [-n NETNS] ARGS...`` and return stdout; raise TopologyError on failure."""
    argv = [IP]
    if netns is not None:
        argv += ["-n", netns]
    argv += list(args)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if check and proc.returncode != 0:
        raise TopologyError(f"{' '.join(argv)} failed: {proc.stderr.strip()}")
    return proc.stdout


def netns_add(name: str) -> None:
    ip("netns", "add", name)


def netns_delete(name: str) -> None:
    """Delete a namespace; a missing one is fine (teardown after a partial setup)."""
    if name in netns_list():
        ip("netns", "delete", name, check=False)


def netns_list() -> list[str]:
    # `ip netns list` prints "NAME (id: N)" for namespaces with an id; keep the name only.
    out = ip("netns", "list", check=False)
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def netns_pids(name: str) -> list[int]:
    """PIDs of every process whose network namespace is ``name``."""
    out = ip("netns", "pids", name, check=False)
    return [int(tok) for tok in out.split() if tok.isdigit()]


def netns_exec_argv(name: str, argv: Sequence[str]) -> list[str]:
    return [IP, "netns", "exec", name, *argv]


def link_names(netns: str | None = None) -> list[str]:
    """Interface names in ``netns`` (root namespace when None), without ``@peer`` suffixes."""
    out = ip("-o", "link", "show", netns=netns, check=False)
    names = []
    for line in out.splitlines():
        parts = line.split(":", 2)
        if len(parts) >= 2:
            names.append(parts[1].strip().split("@", 1)[0])
    return names


def link_delete(name: str, netns: str | None = None) -> None:
    if name in link_names(netns):
        ip("link", "delete", name, netns=netns, check=False)


def kill_group(pid: int, *, grace_s: float, poll: subprocess.Popen[bytes] | None = None) -> None:
    """SIGTERM the process group led by ``pid``, then SIGKILL it after ``grace_s``.

    Only groups we created (``start_new_session=True``) are signalled, so a leader's
    pid is its pgid. ``poll`` (the leader's Popen) lets us reap it and stop waiting early.
    """
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if poll is not None and poll.poll() is not None and not _group_alive(pid):
            return
        if poll is None and not _group_alive(pid):
            return
        time.sleep(0.02)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    if poll is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            poll.wait(timeout=10)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def blocked_signals() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP back while the body runs (setup and teardown).

    A Ctrl-C that arrives mid-teardown would otherwise abandon it halfway and leak
    namespaces; with the signals blocked it stays pending and is delivered (as
    KeyboardInterrupt, or the installed handler) right after the body finishes. Blocking
    is per thread, so this only protects the thread that runs it, which is the thread
    Python delivers signals to when that is the main thread.
    """
    sigs = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)

"""What this host offers: CPUs, memory, disk, and the address peers reach it at."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

from edgevisor import __version__


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def memory_mb() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return 0


def disk_mb(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize // (1024 * 1024)


def capacity(data_dir: Path) -> dict[str, int | str]:
    return {
        "cpu_count": cpu_count(),
        "memory_mb": memory_mb(),
        "disk_mb": disk_mb(data_dir),
        "agent_version": __version__,
    }


def route_source_address(controller_url: str) -> str | None:
    """The local address the kernel would use to reach the controller (no packet is sent)."""
    parts = urlsplit(controller_url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or 80
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
        with socket.socket(info[0], socket.SOCK_DGRAM) as s:
            s.connect(info[4])  # UDP connect only selects a route; nothing is sent
            return str(s.getsockname()[0])
    except OSError:
        return None

"""A pytest plugin: a run stopped with SIGTERM ends as Ctrl-C does.

``timeout``, a CI runner's cancel or a supervisor stop a test run with SIGTERM, whose
default action ends the process at once: no fixture is torn down, so the PostgreSQL
servers, namespaces, mounts and processes the fixtures made stay behind (a throwaway
PostgreSQL left by a killed run was found once). Raised as ``KeyboardInterrupt``, the
signal makes pytest stop the way it does on Ctrl-C: it tears every fixture down and
reports the run as interrupted.

The project's ``tests/conftest.py`` uses it; elsewhere: ``pytest -p edgevisor.testing.sigterm``.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

import pytest

__all__ = ["pytest_configure"]


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"stopped by signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from edgevisor import Client
from edgevisor.testing.controller import RunningController, running_controller


@pytest.fixture
def ctl(tmp_path: Path) -> Iterator[RunningController]:
    overrides = {
        "controller.heartbeat_timeout_s": 1.0,
        "controller.reconcile_interval_s": 0.1,
        "controller.body_limit_bytes": 4096,
    }
    with running_controller(tmp_path / "ctl", overrides) as c:
        yield c


@pytest.fixture
def admin(ctl: RunningController) -> Iterator[Client]:
    with Client(ctl.url, ctl.admin_token) as c:
        yield c

"""The devices demo (``examples/demo_devices.py``, run by ``make demo``) against a fleet."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from devices_wired_helpers import fleet

DEMO = Path(__file__).resolve().parents[3] / "examples" / "demo_devices.py"


def test_demo_devices_exits_zero_and_is_repeatable(tmp_path: Path) -> None:
    with fleet(tmp_path) as f:
        env = {**os.environ, "EDGEVISOR_URL": f.ctl.url, "EDGEVISOR_TOKEN": f.ctl.token}
        for _ in range(2):  # a second run starts from a clean slate again
            res = subprocess.run([sys.executable, str(DEMO)], env=env, capture_output=True,
                                 text=True, timeout=240)  # fmt: skip
            assert res.returncode == 0, res.stdout + res.stderr
            assert "delta" in res.stdout and "'fan': 'on'" in res.stdout
        shadow = f.admin.get_shadow("sensor1", account="demo")
        assert shadow.state["desired"]["fan"] == "on" and shadow.state["reported"]["fan"] == "on"

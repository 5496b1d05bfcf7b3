"""A test run stopped with SIGTERM still tears its fixtures down (edgevisor.testing.sigterm)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

_INNER = """
import time
from pathlib import Path

import pytest

MARK = Path(__file__).parent / "made"


@pytest.fixture
def resource():
    MARK.write_text("x")  # what a fixture makes: a server, a namespace, a mount
    yield
    MARK.unlink()


def test_runs_long(resource):
    (Path(__file__).parent / "started").write_text("x")
    time.sleep(60)
"""


def _run_and_terminate(tmp_path: Path, plugin: bool) -> Path:
    (tmp_path / "test_inner.py").write_text(_INNER)
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)]
    if plugin:
        argv[3:3] = ["-p", "edgevisor.testing.sigterm"]
    proc = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "started").exists():
            assert time.monotonic() < deadline, "the inner test did not start"
            assert proc.poll() is None, proc.communicate()[0].decode()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return tmp_path / "made"


def test_sigterm_runs_the_fixture_teardown(tmp_path: Path) -> None:
    assert not _run_and_terminate(tmp_path, plugin=True).exists()


def test_without_the_plugin_sigterm_leaves_it_behind(tmp_path: Path) -> None:
    # The control: what the plugin is for (SIGTERM's default action skips teardown).
    assert _run_and_terminate(tmp_path, plugin=False).exists()

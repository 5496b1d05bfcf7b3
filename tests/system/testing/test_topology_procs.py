"""System tests of the topology's process handling: agents, signals, stale cleanup."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from edgevisor.testing.topology import Topology, TopologyError, cleanup_stale, leftovers

pytestmark = pytest.mark.root

# Child that builds a topology, starts a sleeper in a host, reports, and waits to be
# signalled. argv[1] = "interrupt" (default handlers) | "plain" (no SIGTERM handling).
CHILD = textwrap.dedent(
    """
    import sys, time
    from edgevisor.testing.topology import Topology
    mode = sys.argv[1]
    if mode == "nested":  # an inner topology that closes must not disarm SIGTERM
        with Topology(1):
            pass
    topo = Topology(2, handle_sigterm=mode != "plain")
    if mode == "forgotten":  # opened without `with`, never closed: atexit closes it
        topo.open()
        p = topo.hosts[0].run(["sleep", "1000"])
        print(topo.prefix, p.pid, flush=True)
        sys.stdin.readline()
        sys.exit(0)
    with topo:
        p = topo.hosts[0].run(["sleep", "1000"])
        print(topo.prefix, p.pid, flush=True)
        time.sleep(1000)
    """
)

# An agent stand-in: prints "ready", then exits 0 on SIGTERM (or ignores it).
FAKE_AGENT = textwrap.dedent(
    """
    import signal, sys, time
    if sys.argv[1] == "ignore":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    print("ready", flush=True)
    while True:
        time.sleep(1)
    """
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait(pred: object, timeout_s: float = 30.0) -> bool:
    assert callable(pred)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


def _start_child(mode: str) -> tuple[subprocess.Popen[str], str, int]:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert child.stdout is not None
    line = child.stdout.readline().split()
    assert len(line) == 2, f"child failed to start (rc={child.poll()})"
    return child, line[0], int(line[1])


def _reap(child: subprocess.Popen[str], prefix: str) -> None:
    if child.poll() is None:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    for pipe in (child.stdin, child.stdout):
        if pipe is not None:
            pipe.close()
    cleanup_stale(prefix, only_dead_owners=False)


@pytest.mark.parametrize(
    ("sig", "mode"),
    [(signal.SIGINT, "interrupt"), (signal.SIGTERM, "interrupt"), (signal.SIGTERM, "nested")],
)
def test_signal_to_owner_tears_everything_down(sig: signal.Signals, mode: str) -> None:
    child, prefix, sleeper = _start_child(mode)
    try:
        assert leftovers(prefix), "topology should exist while the child runs"
        assert _alive(sleeper)
        os.kill(child.pid, sig)
        child.wait(timeout=60)
        assert child.returncode != 0  # KeyboardInterrupt propagated after teardown
        assert leftovers(prefix) == []
        assert _wait(lambda: not _alive(sleeper))
    finally:
        _reap(child, prefix)


def test_a_topology_never_closed_is_closed_at_exit() -> None:
    child, prefix, sleeper = _start_child("forgotten")
    try:
        assert leftovers(prefix)
        assert child.stdin is not None
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.wait(timeout=60) == 0
        assert leftovers(prefix) == []
        assert _wait(lambda: not _alive(sleeper))
    finally:
        _reap(child, prefix)


def test_cleanup_stale_removes_a_killed_runs_leftovers_only() -> None:
    child, prefix, sleeper = _start_child("plain")
    with Topology(1) as mine:
        try:
            os.kill(child.pid, signal.SIGKILL)  # no teardown can run
            child.wait(timeout=30)
            stale = leftovers(prefix)
            assert len(stale) == 4, stale  # fabric + 2 hosts + the root veth
            removed = cleanup_stale()  # default: only runs whose owner pid is dead
            assert set(stale) <= set(removed)
            assert leftovers(prefix) == []
            assert _wait(lambda: not _alive(sleeper))
            # Our own live topology was not touched.
            assert leftovers(mine.prefix)
            assert mine.hosts[0].ping(mine.controller_address)
        finally:
            _reap(child, prefix)
    assert leftovers(mine.prefix) == []


def test_cleanup_stale_refuses_a_too_short_prefix() -> None:
    with pytest.raises(TopologyError):
        cleanup_stale("e")


def test_agent_argv_shape() -> None:
    with Topology(2, host_names=["alpha", "beta"]) as topo:
        argv = topo.agent_argv(
            topo.host("beta"), controller_port=7450, join_token="tok", data_dir="/tmp/d"
        )
        assert argv[0] == str(Path(sys.executable).with_name("edgevisor"))
        assert argv[1:] == [
            "agent",
            "--controller",
            f"http://{topo.controller_address}:7450",
            "--host",
            "beta",
            "--join-token",
            "tok",
            "--data-dir",
            "/tmp/d",
        ]


def test_start_and_stop_agent() -> None:
    with Topology(2) as topo:
        h0, h1 = topo.hosts
        polite = topo.start_agent(
            h0, [sys.executable, "-c", FAKE_AGENT, "polite"], stdout=subprocess.PIPE, text=True
        )
        stubborn = topo.start_agent(
            h1, [sys.executable, "-c", FAKE_AGENT, "ignore"], stdout=subprocess.PIPE, text=True
        )
        assert polite.stdout is not None and stubborn.stdout is not None
        assert polite.stdout.readline().strip() == "ready"
        assert stubborn.stdout.readline().strip() == "ready"
        # The agent runs inside the host's network namespace.
        assert os.readlink(f"/proc/{polite.pid}/ns/net") != os.readlink("/proc/self/ns/net")
        with pytest.raises(TopologyError, match="already running"):
            topo.start_agent(h0, ["sleep", "1"])
        assert topo.stop_agent(h0) == 0
        assert topo.stop_agent(h1, grace_s=0.5) == -signal.SIGKILL
        assert topo.stop_agent(h1) is None
        # A stopped host can get a new agent.
        again = topo.start_agent(h0, ["sleep", "1000"])
        assert again.poll() is None
    assert again.poll() is not None
    assert polite.stdout is not None and stubborn.stdout is not None
    polite.stdout.close()
    stubborn.stdout.close()


def test_exec_timeout_kills_the_command() -> None:
    with Topology(1) as topo:
        marker = f"1000.{os.getpid()}{time.monotonic_ns() % 100000}"  # unique sleep argv
        with pytest.raises(subprocess.TimeoutExpired):
            topo.hosts[0].exec(["sh", "-c", f"sleep {marker} & wait"], timeout_s=1.0)
        found = subprocess.run(["pgrep", "-f", f"sleep {marker}"], capture_output=True, text=True)
        assert found.stdout.strip() == ""
        failed = topo.hosts[0].exec(["sh", "-c", "exit 3"], check=False)
        assert failed.returncode == 3
        with pytest.raises(TopologyError, match="exited 3"):
            topo.hosts[0].exec(["sh", "-c", "exit 3"])

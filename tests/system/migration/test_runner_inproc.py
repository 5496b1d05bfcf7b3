"""The migration runner against two in-process agents running the real ops (as root).

A controller and two full agents in one process (``edgevisor.migration.testbed``), the
kv example domain on a real volume; the runner performs the machine's commands through
the agents' ``migration.*`` ops. Asserts the command sequence, every acknowledged write on
the target, the source released, and the refusals.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgevisor import Client, NotFound
from edgevisor.migration.commands import MigrationRefused
from edgevisor.migration.runner import runner_for
from edgevisor.migration.testbed import Testbed, http, open_testbed, wait_serving
from edgevisor.sdk.migrations import MigrationInfo
from edgevisor.storage.hostfs import read_mountinfo

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

KV_APP = Path(__file__).resolve().parents[3] / "examples" / "domains" / "kv"
PY = os.path.realpath(sys.executable)
KV_CMD = [PY, "-I", "-S", "/task/kv.py", "--port", "8080"]
TAG = f"{os.getpid() % 100000}"
SRC, DST = f"ma{TAG}", f"mb{TAG}"

POST_COPY = [
    "PrepareTarget", "QuiesceSource", f"SetRoles({DST})", "StartOnTarget", "StartFill",
    "Verify", "ReleaseSource",
]  # fmt: skip


@pytest.fixture
def bed(tmp_path: Path) -> Iterator[tuple[Testbed, Client]]:
    with open_testbed(tmp_path, [SRC, DST]) as tb:
        tb.admin.create_account("acme")
        tb.admin.create_account("other")
        with Client(tb.ctl.url, tb.admin.create_token("acme").secret) as acme:
            yield tb, acme
    left = [m.mount_point for m in read_mountinfo() if str(tmp_path) in m.mount_point]
    assert left == [], left


class Writer:
    """A client that keeps writing (and reading back) keys while the domain moves."""

    def __init__(self, acme: Client, name: str) -> None:
        self.acme, self.name = acme, name
        self.acked: dict[str, str] = {}
        self.errors = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _addr(self) -> str:
        addr = self.acme.get_domain(self.name).address
        assert addr
        return addr

    def _run(self) -> None:
        addr, i = self._addr(), 0
        while not self._stop.is_set():
            key, val = f"k{i}", f"v{i}-{time.time()}"
            try:
                code, _ = http("PUT", f"http://{addr}:8080/kv/{key}", val.encode(), timeout_s=2)
                if code == 204:
                    self.acked[key] = val
                    i += 1
                    continue
            except OSError:
                pass
            self.errors += 1
            time.sleep(0.05)
            with contextlib.suppress(Exception):
                addr = self._addr()

    def __enter__(self) -> Writer:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join(30)


def _wait_final(acme: Client, mid: str, deadline_s: float = 180) -> MigrationInfo:
    end = time.monotonic() + deadline_s
    seen = 0
    while True:
        m = acme.get_migration(mid)
        assert m.present_bytes >= seen, "progress went backwards"
        seen = m.present_bytes
        if m.final and m.settled:
            return m
        assert time.monotonic() < end, m
        time.sleep(0.1)


def _all_present(acme: Client, name: str, acked: dict[str, str]) -> None:
    d = acme.get_domain(name)
    assert d.address
    wait_serving(d.address)
    code, body = http("GET", f"http://{d.address}:8080/kv", timeout_s=10)
    assert code == 200
    stored = json.loads(body)
    missing = {k: v for k, v in acked.items() if stored.get(k) != v}
    assert not missing, f"{len(missing)} acknowledged writes lost: {list(missing)[:5]}"


def _volumes(tb: Testbed, host: str) -> list[str]:
    vols = tb.agents[host].agent.capability("volumes")
    return [v["id"] for v in vols.list_volumes()]


def test_post_copy_under_writes_keeps_every_acknowledged_write(
    bed: tuple[Testbed, Client],
) -> None:
    tb, acme = bed
    d = acme.create_domain("kv", KV_CMD, "64M", app=KV_APP, host=SRC)
    assert d.address
    wait_serving(d.address)
    with Writer(acme, "kv") as w:
        time.sleep(1.0)
        m = acme.migrate_domain("kv", DST)
        assert (m.source, m.target, m.mode) == (SRC, DST, "post-copy")
        final = _wait_final(acme, m.id)
        time.sleep(1.0)  # writes continue on the target
    assert final.phase == "committed", final
    assert final.downtime_s is not None and final.downtime_s < 30
    assert final.present_bytes == final.total_bytes == 64 << 20
    assert len(w.acked) > 10
    assert runner_for(tb.ctl.state).trace[m.id] == POST_COPY
    # StartFill first asked the target to hold the fill for the domain's start-up
    # (domains.fill_hold_s: 0 by default, so it answered at once)
    assert runner_for(tb.ctl.state).fill_held_s[m.id] < 30
    shown = acme.get_domain("kv")
    assert shown.host == DST and shown.phase == "running"
    _all_present(acme, "kv", w.acked)
    # the source's copy is released; the target's is a plain primary volume now
    assert _volumes(tb, SRC) == []
    (vid,) = _volumes(tb, DST)
    info = tb.agents[DST].agent.capability("volumes").info(vid)
    assert (info["kind"], info["role"]) == ("plain", "primary")
    assert acme.domain_migration("kv").id == m.id
    kinds = [e.kind for e in tb.admin.recent_events() if e.kind.startswith("migration.")]
    assert kinds[0] == "migration.started" and kinds[-1] == "migration.settled"
    assert "migration.phase" in kinds


def test_abort_during_post_sync_resumes_on_the_source_with_every_write(
    bed: tuple[Testbed, Client],
) -> None:
    tb, acme = bed
    d = acme.create_domain("kv", KV_CMD, "64M", app=KV_APP, host=SRC)
    assert d.address
    wait_serving(d.address)
    with Writer(acme, "kv") as w:
        time.sleep(0.5)
        # a slow fill keeps the migration in post_sync while the writer runs on the target
        m = acme.migrate_domain("kv", DST, rate_bytes_s=1 << 20)
        end = time.monotonic() + 120
        while acme.get_migration(m.id).phase != "post_sync":
            assert time.monotonic() < end
            time.sleep(0.05)
        time.sleep(1.5)
        acme.abort_migration(m.id)
        final = _wait_final(acme, m.id)
        time.sleep(0.5)
    assert (final.phase, final.cause) == ("aborted", "abort"), final
    trace = runner_for(tb.ctl.state).trace[m.id]
    assert trace[:5] == POST_COPY[:5]
    assert trace[5:] == [
        "StopFill", "StopTarget", "ResyncSource", f"SetRoles({SRC})", "ResumeOnSource",
        "DiscardTarget",
    ]  # fmt: skip
    assert acme.get_domain("kv").host == SRC
    _all_present(acme, "kv", w.acked)
    assert _volumes(tb, DST) == []
    assert _volumes(tb, SRC) == ["acme.domain-kv"]


def test_refusals_change_nothing(bed: tuple[Testbed, Client]) -> None:
    tb, acme = bed
    d = acme.create_domain("kv", KV_CMD, "16M", app=KV_APP, host=SRC)
    assert d.address
    with pytest.raises(MigrationRefused, match="already on"):
        acme.migrate_domain("kv", SRC)
    with pytest.raises(NotFound, match="host"):
        acme.migrate_domain("kv", "nowhere")
    with pytest.raises(NotFound):
        acme.migrate_domain("nope", DST)
    with Client(tb.ctl.url, tb.admin.create_token("other").secret) as other:
        with pytest.raises(NotFound):
            other.migrate_domain("kv", DST)
        assert other.list_migrations() == []
    m = acme.migrate_domain("kv", DST, rate_bytes_s=1 << 20)
    with pytest.raises(MigrationRefused, match="already migrating"):
        acme.migrate_domain("kv", DST)
    final = _wait_final(acme, m.id)
    assert final.phase == "committed"
    from edgevisor.migration.commands import AbortRefused

    with pytest.raises(AbortRefused):
        acme.abort_migration(m.id)
    assert acme.get_domain("kv").host == DST
    assert [x.id for x in acme.list_migrations()] == [m.id]


def test_a_restarted_runner_resumes_post_sync_from_the_store(
    bed: tuple[Testbed, Client],
) -> None:
    import asyncio

    tb, acme = bed
    d = acme.create_domain("kv", KV_CMD, "64M", app=KV_APP, host=SRC)
    assert d.address
    wait_serving(d.address)
    with Writer(acme, "kv") as w:
        m = acme.migrate_domain("kv", DST, rate_bytes_s=4 << 20)
        end = time.monotonic() + 120
        while acme.get_migration(m.id).phase != "post_sync":
            assert time.monotonic() < end
            time.sleep(0.05)
        time.sleep(1.0)
        runner = runner_for(tb.ctl.state)
        assert runner.loop is not None
        # the controller goes away: every task of the runner ends; only the store remains
        asyncio.run_coroutine_threadsafe(runner.aclose(), runner.loop).result(60)
        before = acme.get_migration(m.id)
        assert before.phase == "post_sync" and not before.settled
        time.sleep(0.5)
        resumed = asyncio.run_coroutine_threadsafe(runner.resume_all(), runner.loop).result(60)
        assert resumed == [m.id]
        final = _wait_final(acme, m.id)
        assert final.present_bytes >= before.present_bytes
    assert final.phase == "committed", final
    # after the restart the machine re-issued the fill (it resumes from the bitmap)
    assert runner.trace[m.id][-3:] == ["StartFill", "Verify", "ReleaseSource"]
    _all_present(acme, "kv", w.acked)
    assert _volumes(tb, SRC) == []


def test_cli_migrate_watch_and_list(bed: tuple[Testbed, Client]) -> None:
    from typer.testing import CliRunner

    from edgevisor.cli.main import app as cli_app

    tb, acme = bed
    acme.create_domain("kv", KV_CMD, "16M", app=KV_APP, host=SRC)
    auth = ["--url", tb.ctl.url, "--token", acme.token or ""]
    runner = CliRunner()
    res = runner.invoke(cli_app, ["domain", "migrate", "kv", "--to", DST, "--watch", *auth])
    assert res.exit_code == 0, res.output
    assert "committed" in res.output and "downtime" in res.output
    res = runner.invoke(cli_app, ["domain", "migrations", "--json", *auth])
    assert res.exit_code == 0, res.output
    (row,) = json.loads(res.output)
    assert (row["phase"], row["source"], row["target"]) == ("committed", SRC, DST)
    # domain show carries the migration's progress (all present at commit) and downtime
    res = runner.invoke(cli_app, ["domain", "show", "kv", *auth])
    assert res.exit_code == 0, res.output
    assert f"{SRC} -> {DST}" in res.output and "committed" in res.output, res.output
    assert "(100%)" in res.output and "switch downtime" in res.output, res.output
    res = runner.invoke(cli_app, ["domain", "show", "kv", "--json", *auth])
    shown = json.loads(res.output)
    assert shown["host"] == DST and shown["migration"]["phase"] == "committed", shown
    # refusals come back as errors, with nothing changed
    res = runner.invoke(cli_app, ["domain", "migrate", "kv", "--to", DST, *auth])
    assert res.exit_code != 0 and "already on" in res.output
    res = runner.invoke(cli_app, ["domain", "migrate", "kv", "--abort", *auth])
    assert res.exit_code != 0 and "committed" in res.output
    assert acme.get_domain("kv").host == DST

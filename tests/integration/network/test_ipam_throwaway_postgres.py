"""The throwaway PostgreSQL used by store tests: starts, serves, and leaves nothing behind."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from edgevisor.testing.postgres import (
    PostgresServer,
    PostgresUnavailable,
    find_bin_dir,
    throwaway_postgres,
)


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _postmaster_pid(root: Path) -> int:
    return int((root / "data" / "postmaster.pid").read_text().split("\n", 1)[0])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_cluster_serves_loopback_and_is_removed_on_exit() -> None:
    with throwaway_postgres(database="probe") as pg:
        assert pg.root is not None and pg.port is not None
        root, port = pg.root, pg.port
        pid = _postmaster_pid(root)
        assert pg.url == f"postgresql+psycopg://postgres@127.0.0.1:{port}/probe"
        engine = create_engine(pg.url)
        other = create_engine(pg.create_database("second_db"))
        try:
            with engine.connect() as c:
                assert c.execute(text("SELECT current_database()")).scalar() == "probe"
                listen = c.execute(text("SHOW listen_addresses")).scalar()
                assert listen == "127.0.0.1"
            with other.connect() as c:
                assert c.execute(text("SELECT current_database()")).scalar() == "second_db"
        finally:
            engine.dispose()
            other.dispose()
        assert (root / f".s.PGSQL.{port}").exists()  # unix socket inside the temp dir
    assert not root.exists()
    assert not _port_open(port)
    for _ in range(100):  # the postmaster is gone (reaped by init, maybe a little later)
        if not _alive(pid) or Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"postmaster {pid} still running")


def test_stop_is_idempotent_and_cleans_up_after_an_error_in_the_block() -> None:
    server = PostgresServer()
    with pytest.raises(RuntimeError, match="boom"), server:
        root = server.root
        raise RuntimeError("boom")
    assert root is not None and not root.exists()
    server.stop()  # again: nothing to do


def test_missing_binaries_give_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(PostgresUnavailable, match="initdb, pg_ctl, pg_isready") as err:
        find_bin_dir(tmp_path)
    assert str(tmp_path) in str(err.value) and "postgresql" in str(err.value)
    with pytest.raises(PostgresUnavailable):
        PostgresServer(bin_dir=tmp_path).start()


def test_bad_database_name_is_refused(postgres_server: PostgresServer) -> None:
    with pytest.raises(ValueError, match="letters, digits"):
        postgres_server.create_database("x; DROP")

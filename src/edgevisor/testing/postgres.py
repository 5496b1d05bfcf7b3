"""A throwaway PostgreSQL cluster for tests and benchmarks.

``initdb`` a fresh cluster in a temporary directory, start it on a free loopback port with
its unix socket inside that directory, create a database and hand out a SQLAlchemy URL
(``postgresql+psycopg://postgres@127.0.0.1:PORT/DB``). ``stop()`` shuts the server down
and removes the directory. PostgreSQL refuses to run as root, so when we are root the
cluster runs as the ``postgres`` system user (the directory is chowned to it).

Authentication is ``trust``; that is acceptable only because the cluster listens on
127.0.0.1 and a socket directory nobody else knows, and lives as long as one test run.
Durability is switched off (``fsync=off``): nothing here must survive a crash.

Use it as a context manager::

    with throwaway_postgres() as pg:
        engine = create_engine(pg.url)
        other_url = pg.create_database("second")

or as an object (``PostgresServer().start()`` ... ``.stop()``).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "PostgresServer",
    "PostgresUnavailable",
    "find_bin_dir",
    "throwaway_postgres",
]

_SUPERUSER = "postgres"
_OS_USER = "postgres"


class PostgresUnavailable(RuntimeError):
    """The throwaway cluster could not be created or started; the message says why."""


def find_bin_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Return the directory holding ``initdb``/``pg_ctl``; the newest major version wins.

    An explicit directory is the only one tried; otherwise ``$EDGEVISOR_PG_BIN``, then
    ``/usr/lib/postgresql/*/bin``, then ``PATH``.
    """
    candidates: list[Path] = []
    if explicit is not None:
        candidates.append(Path(explicit))
    elif os.environ.get("EDGEVISOR_PG_BIN"):
        candidates.append(Path(os.environ["EDGEVISOR_PG_BIN"]))

    def _major(p: str) -> int:
        name = Path(p).parent.name
        return int(name) if name.isdigit() else -1

    if not candidates:
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_major, reverse=True)
        candidates.extend(Path(f) for f in found)
        on_path = shutil.which("initdb")
        if on_path:
            candidates.append(Path(on_path).parent)
    for cand in candidates:
        if all((cand / tool).is_file() for tool in ("initdb", "pg_ctl", "pg_isready")):
            return cand
    looked = ", ".join(str(c) for c in candidates) or "(no candidate directory)"
    raise PostgresUnavailable(
        "PostgreSQL server binaries (initdb, pg_ctl, pg_isready) not found; looked in "
        f"{looked}. Install the Debian package `postgresql` or set EDGEVISOR_PG_BIN."
    )


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """One throwaway cluster. ``start()`` returns the URL of its first database."""

    def __init__(
        self,
        *,
        database: str = "edgevisor_test",
        bin_dir: str | os.PathLike[str] | None = None,
        base_dir: str | os.PathLike[str] | None = None,
        start_timeout_s: float = 60.0,
        extra_options: Sequence[str] = (),
    ) -> None:
        self.database = database
        self._bin_dir_arg = bin_dir
        self._base_dir = base_dir
        self.start_timeout_s = start_timeout_s
        self._extra_options = tuple(extra_options)
        self.bin_dir: Path | None = None
        self.root: Path | None = None
        self.port: int | None = None
        self._started = False
        self._as_postgres = os.geteuid() == 0

    # -- public ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the database created by :meth:`start`."""
        return self.url_for(self.database)

    def url_for(self, database: str) -> str:
        if self.port is None:
            raise PostgresUnavailable("the throwaway PostgreSQL is not started")
        return f"postgresql+psycopg://{_SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def start(self) -> str:
        """Create, start and wait for the cluster; return :attr:`url`. Idempotent."""
        if self._started:
            return self.url
        self.bin_dir = find_bin_dir(self._bin_dir_arg)
        try:
            self._make_root()
            self._initdb()
            # A free port can be taken between probing and binding; try a few.
            last: PostgresUnavailable | None = None
            for _ in range(3):
                self.port = _free_loopback_port()
                try:
                    self._pg_ctl_start()
                    break
                except PostgresUnavailable as exc:
                    last = exc
                    self._kill_postmaster()
            else:
                assert last is not None
                raise last
            self._started = True
            self._wait_ready()
            self.create_database(self.database)
        except BaseException:
            self.stop()
            raise
        return self.url

    def create_database(self, name: str | None = None) -> str:
        """Create another database in this cluster (a fresh one per test module, say)."""
        name = name or f"db_{uuid.uuid4().hex[:12]}"
        if not name.replace("_", "").isalnum():
            raise ValueError(f"database name {name!r}: use letters, digits and _ only")
        self._run(
            [
                self._tool("createdb"),
                "-h", "127.0.0.1", "-p", str(self.port), "-U", _SUPERUSER, name,
            ],
            what=f"createdb {name}",
        )
        return self.url_for(name)

    def stop(self) -> None:
        """Stop the server (fast, no checkpoint) and remove its directory. Idempotent."""
        root, self.root = self.root, None
        if root is None:
            return
        data = root / "data"
        try:
            if (data / "postmaster.pid").exists() and self.bin_dir is not None:
                with contextlib.suppress(subprocess.SubprocessError, OSError):
                    subprocess.run(
                        [str(self.bin_dir / "pg_ctl"), "stop", "-D", str(data),
                         "-m", "immediate", "-w", "-t", "30"],
                        capture_output=True, timeout=40, cwd=str(root),
                        **self._user_kwargs(),
                    )
            self._kill_postmaster(data)
        finally:
            shutil.rmtree(root, ignore_errors=True)
            self._started = False
            self.port = None

    def log_tail(self, lines: int = 40) -> str:
        if self.root is None:
            return ""
        try:
            text = (self.root / "server.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- internals ------------------------------------------------------------------------

    def _tool(self, name: str) -> str:
        assert self.bin_dir is not None
        return str(self.bin_dir / name)

    def _user_kwargs(self) -> dict[str, Any]:
        if not self._as_postgres:
            return {}
        try:
            pw = pwd.getpwnam(_OS_USER)
        except KeyError as exc:
            raise PostgresUnavailable(
                f"running as root but there is no `{_OS_USER}` system user to run "
                "PostgreSQL as (it refuses root); install the `postgresql` package"
            ) from exc
        return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update({"LC_ALL": "C", "LANG": "C", "TZ": "UTC"})
        if self.root is not None:
            env["HOME"] = str(self.root)
        return env

    def _run(self, argv: list[str], *, what: str, timeout_s: float | None = None) -> str:
        try:
            proc = subprocess.run(
                argv, capture_output=True, text=True, env=self._env(),
                cwd=str(self.root), timeout=timeout_s or self.start_timeout_s,
                **self._user_kwargs(),
            )
        except subprocess.TimeoutExpired as exc:
            raise PostgresUnavailable(
                f"{what} did not finish within {exc.timeout:.0f} s\n{self.log_tail()}"
            ) from exc
        if proc.returncode != 0:
            raise PostgresUnavailable(
                f"{what} failed with exit code {proc.returncode}:\n"
                f"{proc.stdout}{proc.stderr}\n{self.log_tail()}"
            )
        return str(proc.stdout)

    def _make_root(self) -> None:
        base = self._base_dir
        if base is None and self._as_postgres:
            # The postgres user must be able to traverse every parent; /tmp always allows.
            base = "/tmp"
        self.root = Path(tempfile.mkdtemp(prefix="edgevisor-pg-", dir=base))
        if self._as_postgres:
            pw = pwd.getpwnam(_OS_USER)
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        os.chmod(self.root, 0o700)

    def _initdb(self) -> None:
        assert self.root is not None
        self._run(
            [
                self._tool("initdb"), "-D", str(self.root / "data"), "-U", _SUPERUSER,
                "--auth=trust", "--encoding=UTF8", "--no-locale", "--no-sync",
            ],
            what="initdb",
        )

    def _pg_ctl_start(self) -> None:
        assert self.root is not None and self.port is not None
        options = [
            "-c", "listen_addresses=127.0.0.1",
            "-p", str(self.port),
            "-k", str(self.root),
            "-c", "fsync=off",
            "-c", "synchronous_commit=off",
            "-c", "full_page_writes=off",
            "-c", "max_connections=200",
            *self._extra_options,
        ]
        self._run(
            [
                self._tool("pg_ctl"), "start", "-D", str(self.root / "data"),
                "-l", str(self.root / "server.log"), "-w",
                "-t", str(int(self.start_timeout_s)), "-o", " ".join(options),
            ],
            what=f"pg_ctl start on port {self.port}",
            timeout_s=self.start_timeout_s + 10,
        )

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        argv = [self._tool("pg_isready"), "-h", "127.0.0.1", "-p", str(self.port),
                "-U", _SUPERUSER, "-t", "5"]
        while True:
            proc = subprocess.run(argv, capture_output=True, text=True, env=self._env(),
                                  timeout=30)
            if proc.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise PostgresUnavailable(
                    f"PostgreSQL on 127.0.0.1:{self.port} not ready after "
                    f"{self.start_timeout_s:.0f} s: {proc.stdout.strip()}\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def _kill_postmaster(self, data: Path | None = None) -> None:
        """SIGKILL the postmaster we started if it is still there (its pid is in its file)."""
        if data is None:
            if self.root is None:
                return
            data = self.root / "data"
        try:
            pid = int((data / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)


@contextlib.contextmanager
def throwaway_postgres(**kwargs: Any) -> Iterator[PostgresServer]:
    """Start a :class:`PostgresServer` for the ``with`` block; always stopped and removed."""
    server = PostgresServer(**kwargs)
    try:
        server.start()
        yield server
    finally:
        server.stop()

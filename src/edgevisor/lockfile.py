"""One process per data dir: an exclusive ``flock`` held for the life of the process."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO

from edgevisor.errors import Conflict

__all__ = ["DataDirLock"]


class DataDirLock:
    """An exclusive ``flock`` on ``<data_dir>/edgevisor.lock``; released on process exit."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "edgevisor.lock"
        self._fh: IO[str] | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")  # noqa: SIM115 (held for the life of the process)
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise Conflict(
                f"data dir {self.path.parent} is in use by {holder}; "
                "stop it first or pass another --data-dir"
            ) from exc
        fh.seek(0)
        fh.truncate()
        fh.write(f"edgevisor pid {os.getpid()}\n")
        fh.flush()
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None

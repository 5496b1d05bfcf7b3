"""How a move's transaction runs (api_addresses._run): the hot path on the event loop
without waiting, in a worker thread with waiting when the write lock was busy, and the
Session path when the hot path leaves the call to it."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from edgevisor.control import api_addresses
from edgevisor.control.addr_move import Busy


class _Store:
    def __init__(self, url: str) -> None:
        self.url = url


class _State:
    def __init__(self, url: str) -> None:
        self.store = _Store(url)


def _run(st: Any, fn: Any, fast: Any) -> Any:
    return asyncio.run(api_addresses._run(st, fn, fast))


def test_hot_path_served_on_the_loop_without_waiting(tmp_path: Path) -> None:
    calls: list[tuple[bool, str]] = []
    loop_thread = threading.get_ident()

    def fast(wait: bool) -> str:
        calls.append((wait, "loop" if threading.get_ident() == loop_thread else "worker"))
        return "moved"

    def fn(_s: Session) -> str:
        raise AssertionError("the Session path must not run")

    assert _run(_State(f"sqlite:///{tmp_path / 's.db'}"), fn, fast) == "moved"
    assert calls == [(False, "loop")]


def test_busy_lock_retried_in_a_worker_thread_with_waiting(tmp_path: Path) -> None:
    calls: list[tuple[bool, bool]] = []
    loop_thread = threading.get_ident()

    def fast(wait: bool) -> str:
        calls.append((wait, threading.get_ident() == loop_thread))
        if not wait:
            raise Busy
        return "moved"

    def fn(_s: Session) -> str:
        raise AssertionError("the Session path must not run")

    assert _run(_State(f"sqlite:///{tmp_path / 's.db'}"), fn, fast) == "moved"
    assert calls == [(False, True), (True, False)]


def test_session_path_serves_what_the_hot_path_leaves(tmp_path: Path) -> None:
    calls: list[bool] = []

    def fast(wait: bool) -> None:
        calls.append(wait)
        return None

    def fn(s: Session) -> int:
        return int(s.execute(text("SELECT 41 + 1")).scalar_one())

    assert _run(_State(f"sqlite:///{tmp_path / 's.db'}"), fn, fast) == 42
    assert calls == [False]  # not tried again: the Session path has the exact errors

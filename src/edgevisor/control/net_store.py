"""The controller's store access for the network tables (:class:`NetStore`).

On SQLite the network operations use their own engine with ``BEGIN IMMEDIATE`` (as
:mod:`edgevisor.network.pools` requires) and the hot paths (allocation, move) keep a
connection each; on PostgreSQL they share the store's engine.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING

from sqlalchemy import create_engine
from sqlalchemy.orm import Session, sessionmaker

from edgevisor.control.state import ControllerState
from edgevisor.network import records
from edgevisor.network.fast_alloc import FastAllocator

if TYPE_CHECKING:
    from edgevisor.control.addr_move import FastMover
    from edgevisor.control.addr_sync import ReportWriter

__all__ = ["NetStore", "net_store"]


class NetStore:
    """Sessions for the network tables (``BEGIN IMMEDIATE`` on SQLite)."""

    def __init__(self, st: ControllerState) -> None:
        url = st.store.url
        if url.startswith("sqlite"):
            self.engine = create_engine(
                url, connect_args={"check_same_thread": False, "timeout": 30}
            )
            records.configure_sqlite(self.engine)
            self._own = True
        else:
            self.engine = st.store.engine
            self._own = False
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        # Reconciler back-off per host that keeps failing: host -> (next try, delay s).
        self.backoff: dict[str, tuple[float, float]] = {}
        self.reports: ReportWriter | None = None

    @functools.cached_property
    def allocator(self) -> FastAllocator:
        """The allocation hot path on its own connection (bulk callers; see fast_alloc)."""
        return FastAllocator(self.engine)

    @functools.cached_property
    def mover(self) -> FastMover | None:
        """The remap hot path on its own connection (SQLite; see :mod:`.addr_move`)."""
        from edgevisor.control.addr_move import FastMover  # it imports addr_sync

        return FastMover(self.engine) if self._own else None

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """One transaction: committed on success, rolled back on any exception."""
        with self._sessions() as s, s.begin():
            yield s

    def dispose(self) -> None:
        if "allocator" in self.__dict__:
            self.allocator.close()
        mover = self.__dict__.get("mover")
        if mover is not None:
            mover.close()
        if self._own:
            self.engine.dispose()


def net_store(st: ControllerState) -> NetStore:
    """The :class:`NetStore` of a controller, made on first use, disposed with it."""
    ns: NetStore | None = getattr(st, "_edgevisor_netstore", None)
    if ns is None:
        ns = NetStore(st)
        object.__setattr__(st, "_edgevisor_netstore", ns)
        weakref.finalize(st, ns.dispose)
    return ns

"""A fill lane of a lazy volume: one source connection on its own thread and event loop.

The lazy volume's fill runs on the owning loop and hands each fetch to a lane
(:meth:`Lane.run`); the lane's connection is created, used and closed only on the lane's
loop. Cancelling a fetch waits until it really ended on the lane, so no fetched bytes can
land after the caller gave the blocks up.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgevisor.storage.lazy import RemoteSource

__all__ = ["Lane", "close_all"]


class Lane:
    """One fill connection with its own thread and event loop.

    TLS decryption (``SSLObject.read``), ``recv_into`` and ``pwrite`` release the GIL, so
    lanes on threads use several cores where connections on one loop would share one.
    """

    def __init__(self, name: str) -> None:
        self.source: RemoteSource | None = None  # touched only on this lane's loop
        self._pending: set[threading.Event] = set()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    async def run(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` on the lane; a cancelled caller still waits for it to end, so
        fetched bytes never land on blocks a waiting local write owns by then."""
        done = threading.Event()
        result: concurrent.futures.Future[None] = concurrent.futures.Future()
        task: list[asyncio.Task[None]] = []

        def finished(t: asyncio.Task[None]) -> None:
            done.set()
            if result.done():
                return
            if t.cancelled():
                result.cancel()
            elif (exc := t.exception()) is not None:
                result.set_exception(exc)
            else:
                result.set_result(None)

        def start() -> None:  # on the lane's loop
            task.append(self.loop.create_task(coro))
            task[0].add_done_callback(finished)

        self._pending.add(done)
        try:
            self.loop.call_soon_threadsafe(start)
            try:
                await asyncio.wrap_future(result)
            except asyncio.CancelledError:
                with contextlib.suppress(RuntimeError):  # the lane is closed already
                    self.loop.call_soon_threadsafe(lambda: task[0].cancel())
                await asyncio.to_thread(done.wait)
                raise
        finally:
            self._pending.discard(done)

    async def close(self) -> None:
        """Idempotent; safe to call again after a cancelled close."""
        if self.loop.is_closed():
            return
        src, self.source = self.source, None
        if src is not None:
            with contextlib.suppress(Exception):
                await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(src.aclose(), self.loop))
        self.loop.call_soon_threadsafe(self.loop.stop)
        await asyncio.to_thread(self._thread.join)
        for done in list(self._pending):  # stopped: nothing can land any more
            done.set()
        self.loop.close()


async def close_all(lanes: list[Lane]) -> None:
    for lane in lanes:
        await lane.close()

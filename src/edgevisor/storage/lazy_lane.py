"""Fill lanes of a lazy volume: one source connection each, on a thread of its own.

The lazy volume's fill runs on the owning loop and hands each fetch to a lane; the lane's
connection is created, used and closed only on the lane's thread. Two kinds:

* :class:`BlockingLane` (used when the source says where it is, ``endpoint``): a plain
  thread keeping up to ``PIPELINE_DEPTH`` reads in flight over a
  :class:`~edgevisor.storage.nbd_blocking.BlockingReader` (the next requests are sent
  before the last reply is read, so the source never waits for them); no event loop at
  all. Its connection opens on first use, or ahead of it (:meth:`FillLanes.connect_soon`).
  Its stores run on store threads (one per lane), so the lane reads its next run while
  the disk takes the last one (``O_DIRECT`` writes wait for the device).
* :class:`Lane`: a thread with its own event loop awaiting the source's ``connect`` (for
  sources that cannot be reopened as blocking connections).

Cancelling a fetch waits until it really ended on the lane (and its store on the store
thread), so no fetched bytes can land after the caller gave the blocks up.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import mmap
import queue
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edgevisor.errors import PeerUnavailable
from edgevisor.storage.nbd_blocking import BlockingReader
from edgevisor.storage.nbd_client import Endpoint

if TYPE_CHECKING:
    from edgevisor.storage.lazy_parts import RemoteSource

__all__ = ["PIPELINE_DEPTH", "BlockingLane", "FillLanes", "Lane"]

log = logging.getLogger(__name__)

PIPELINE_DEPTH = 4
"""Reads a blocking lane keeps in flight on its connection: the source sends the next
reply while this side decrypts and stores the last (one at a time, the source sat idle
for a round trip per read). Read when a fill's lanes are made (a benchmark may set it)."""


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


@dataclass(eq=False)
class _Read:
    offset: int
    view: memoryview
    future: concurrent.futures.Future[None]


_CONNECT = object()
"""A lane job: open the connection ahead of the first read."""


class BlockingLane:
    """One blocking connection to ``endpoint`` on its own thread, opened on first use,
    with up to ``depth`` reads in flight on it.

    Theory of operation (the lane's thread)::

        take jobs while fewer than ``depth`` reads are in flight (waiting for one only
        when none is) -> send each at once (BlockingReader.submit) -> receive the next
        completed read (any order: matched by handle), resolve its future -> repeat
        the link breaks -> every read in flight fails with PeerUnavailable (the fill
        retries exactly those, on a new connection); the next read reconnects
        close() -> reads not yet sent fail, the reader is closed (a blocked receive
        returns at once, the reads in flight fail), the thread ends

    A read's future is *running* from the moment it is taken: a cancelled caller then
    waits for the read to end (its reply landed, or the link broke), so no bytes land in
    a buffer after its owner gave it up.
    """

    def __init__(self, name: str, endpoint: Endpoint, depth: int = PIPELINE_DEPTH) -> None:
        self.endpoint = endpoint
        self.depth = depth
        self.reader: BlockingReader | None = None  # touched only on this lane's thread
        self._jobs: queue.SimpleQueue[_Read | object | None] = queue.SimpleQueue()
        self._sent: dict[int, _Read] = {}  # ticket -> read in flight (the lane's thread)
        self._closing = False
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def _work(self) -> None:
        try:
            self._pump()
        except BaseException:  # a bug: fail what is queued rather than hang its callers
            log.exception("fill lane %s failed", self._thread.name)
        finally:
            self._closing = True
            self._fail_sent(PeerUnavailable("fill lane closed"))
            if self.reader is not None:
                self.reader.close()
                self.reader = None
            while True:  # jobs queued behind the end (close() refuses new ones)
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if isinstance(job, _Read) and job.future.set_running_or_notify_cancel():
                    job.future.set_exception(PeerUnavailable("fill lane closed"))

    def _pump(self) -> None:
        sent = self._sent
        stop = False
        while True:
            while not stop and len(sent) < self.depth:
                try:  # wait for work only when nothing is in flight
                    job = self._jobs.get(block=not sent)
                except queue.Empty:
                    break
                if job is None:
                    stop = True
                elif job is _CONNECT:
                    with contextlib.suppress(PeerUnavailable):  # the next read retries
                        self.connection()
                elif isinstance(job, _Read):
                    self._send(job)
            if not sent:
                if stop:
                    return
                continue
            reader = self.reader
            assert reader is not None  # reads are in flight on it
            try:
                ticket, err = reader.receive()
            except PeerUnavailable as e:
                self._broken(e)
                continue
            read = sent.pop(ticket)
            if err is None:
                read.future.set_result(None)
            else:
                read.future.set_exception(err)

    def _send(self, read: _Read) -> None:
        if not read.future.set_running_or_notify_cancel():
            return  # its caller gave it up before it was sent
        if self._closing:
            read.future.set_exception(PeerUnavailable("fill lane closed"))
            return
        try:
            reader = self.connection()
            ticket = reader.submit(read.offset, read.view)
        except PeerUnavailable as e:  # the reader closed itself
            read.future.set_exception(e)
            self._broken(e)
        except BaseException as e:
            read.future.set_exception(e)
        else:
            self._sent[ticket] = read

    def _broken(self, e: PeerUnavailable) -> None:
        """The link broke: fail exactly the reads in flight on it; the next one reconnects."""
        if self.reader is not None:
            self.reader.abandoned()
            self.reader = None
        self._fail_sent(e)

    def _fail_sent(self, e: PeerUnavailable) -> None:
        reads = list(self._sent.values())
        self._sent.clear()  # in place: the pump holds this dict
        for read in reads:
            read.future.set_exception(PeerUnavailable(str(e)))

    def connection(self) -> BlockingReader:
        """The lane's reader (on the lane's thread); opened here when there is none."""
        if self.reader is None:
            self.reader = BlockingReader(self.endpoint)
            if self._closing:  # close() ran while we connected: it could not unblock us
                self.reader.close()
        return self.reader

    def connect_soon(self) -> None:
        """Open the connection on the lane's thread ahead of the first read (which queues
        behind it); a failure is left to that read, which connects again."""
        if not self._closing:
            self._jobs.put(_CONNECT)

    async def read(self, offset: int, view: memoryview) -> None:
        """Read ``len(view)`` bytes at ``offset`` into ``view`` on the lane (pipelined
        with the lane's other reads); a cancelled caller still waits for it to end.
        Raises PeerUnavailable when the link breaks or the lane is closed, and
        NBDCommandError when the source refuses the read."""
        if self._closing:
            raise PeerUnavailable("fill lane closed")
        fut: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._jobs.put(_Read(offset, view, fut))
        try:
            await asyncio.wrap_future(fut)
        except asyncio.CancelledError:
            fut.cancel()  # fails if it was sent already: then wait for the end
            await asyncio.to_thread(concurrent.futures.wait, [fut])
            raise

    @property
    def in_flight(self) -> int:
        """Reads sent and not completed (a snapshot, for tests and benchmarks)."""
        return len(self._sent)

    async def close(self) -> None:
        """Idempotent: reads not yet sent and reads in flight fail, the thread ends."""
        self._closing = True
        self._jobs.put(None)
        reader = self.reader
        if reader is not None:
            reader.close()  # thread-safe: a blocked recv returns at once
        await asyncio.to_thread(self._thread.join)


AnyLane = Lane | BlockingLane
Store = Callable[[int, memoryview], object]
"""Stores fetched blocks ``(first block, data)``; called on a lane's or a store thread."""


class FillLanes:
    """A lazy volume's fill lanes, used round-robin, with reusable reply buffers.

    Blocking lanes when ``endpoint`` is known, else lanes with an event loop awaiting
    ``connect``. A fetch reads into a buffer and hands it to ``store`` (on a store
    thread for blocking lanes, else on the lane's thread); a failed attempt is retried
    (new connection) until its deadline.
    """

    def __init__(
        self,
        n: int,
        endpoint: Endpoint | None,
        connect: Callable[[], Awaitable[RemoteSource]],
        store: Store,
        *,
        block_size: int,
        buffer_bytes: int,
        reconnect_interval_s: float,
    ) -> None:
        self.lanes: list[AnyLane] = [
            BlockingLane(f"lazy-fill-{i}", endpoint, PIPELINE_DEPTH)
            if endpoint
            else Lane(f"lazy-fill-{i}")
            for i in range(n)
        ]
        self._connect = connect
        self._store = store
        self._bs = block_size
        self._buffer_bytes = buffer_bytes
        self._reconnect_interval_s = reconnect_interval_s
        self._buffers: list[mmap.mmap] = []
        # Stores of blocking lanes (O_DIRECT writes wait for the disk): one thread per lane.
        self._storer = concurrent.futures.ThreadPoolExecutor(n or 1, "lazy-store")
        self._turn = itertools.cycle(range(n))
        self._closer: asyncio.Task[None] | None = None

    def connect_soon(self) -> None:
        """Blocking lanes open their connections now, each on its thread (TCP, NBD and
        TLS handshakes): a fill created ahead of a switch (held) has them ready at the
        release instead of paying them in its first fetches."""
        for lane in self.lanes:
            if isinstance(lane, BlockingLane):
                lane.connect_soon()

    async def fetch(
        self, first: int, length: int, deadline: float, closed: Callable[[], bool]
    ) -> None:
        """Fetch ``length`` bytes from block ``first`` and store them; raises
        PeerUnavailable once ``deadline`` passed (or ``closed()``) without success."""
        lane = self.lanes[next(self._turn)]
        while True:
            # Page-aligned (mmap): the store can write it with O_DIRECT.
            buf = self._buffers.pop() if self._buffers else mmap.mmap(-1, self._buffer_bytes)
            view = memoryview(buf)[:length]
            try:
                if isinstance(lane, BlockingLane):
                    await lane.read(first * self._bs, view)
                    # The store runs on a store thread: the lane goes on with its next
                    # fetch meanwhile (network and disk overlap instead of taking turns).
                    await self._stored(first, view)
                else:
                    await lane.run(self._loop_step(lane, first, view))
            except (PeerUnavailable, OSError) as e:
                # ``buf`` is dropped, not reused: a late reply might still land in it.
                if time.monotonic() >= deadline or closed():
                    raise PeerUnavailable(str(e)) from e
                await asyncio.sleep(self._reconnect_interval_s)
                continue
            self._buffers.append(buf)  # only after success: the reply is complete
            return

    async def _stored(self, first: int, view: memoryview) -> None:
        """Store on a store thread; a cancelled caller still waits for the store to end
        (its bytes must not land after the caller gave the blocks up or closed)."""
        fut = asyncio.get_running_loop().run_in_executor(self._storer, self._store, first, view)
        try:
            await asyncio.shield(fut)
        except asyncio.CancelledError:
            await asyncio.wait([fut])
            raise

    async def _loop_step(self, lane: Lane, first: int, view: memoryview) -> None:
        """Runs on the lane's loop: its connection only ever lives there."""
        src = lane.source
        if src is None:
            src = lane.source = await self._connect()
        try:
            read_into = getattr(src, "read_into", None)
            if read_into is not None:
                await read_into(first * self._bs, view)
            else:  # a source without zero-copy reads
                view[:] = await src.read(first * self._bs, len(view))
        except PeerUnavailable:
            lane.source = None
            with contextlib.suppress(Exception):
                await src.aclose()
            raise
        # Still on the lane's thread: pwrite releases the GIL, the main loop runs on.
        self._store(first, view)

    async def close(self) -> None:
        """Idempotent. Closing runs as its own task, shielded: a cancelled caller cannot
        leave a lane half closed; the next call waits for it."""
        if self._closer is None:
            self._buffers.clear()
            self._closer = asyncio.create_task(self._close_all())
        await asyncio.shield(self._closer)

    async def _close_all(self) -> None:
        for lane in self.lanes:
            await lane.close()
        await asyncio.to_thread(self._storer.shutdown, wait=True)

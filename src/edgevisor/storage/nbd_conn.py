"""One NBD server session: socket I/O around the sans-IO core, tuned for few copies.

Plain-TCP sessions drive a non-blocking socket straight from the event loop
(``add_reader``/``add_writer``): ``recv_into`` lands bytes in the core's buffer, a WRITE's
payload is handed to the device as a view of that buffer (no copy) when the device can
write without waiting, and a READ from a file-backed device is answered with the reply
header followed by ``os.sendfile`` from the device's file (no user-space copy). Replies
that cannot go out at once wait in a queue of views (again no copy); a long queue pauses
reading (backpressure).

Small reads are the latency case (a queue-depth-1 client waits for each reply): they are
answered inside the readable callback, ``pread`` straight into the reply frame and sent
in one ``send`` as soon as no further request is buffered -- no task, no thread hop, no
extra loop iteration. On a small VM the rest of a QD1 round trip is mostly wake-up cost,
so every bit of Python between ``recv_into`` and that ``send`` shows in the latency.

After ``STARTTLS`` the session continues over the same core on a thread of its own with a
blocking TLS socket (:mod:`edgevisor.storage.nbd_tls_session`: no memory BIO, the
encryption runs without the GIL), or, with ``NBDServer(tls_threads=False)``, on asyncio's
TLS transport (``connect_accepted_socket(ssl=...)``) as an
:class:`asyncio.BufferedProtocol`.

Requests a device cannot finish without waiting (flush, FUA, a lazy volume's remote
fetch) run as tasks; replies go out in completion order, matched by handle.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import socket
import ssl
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from edgevisor.errors import EdgevisorError
from edgevisor.proto.nbd import ServerConnection
from edgevisor.proto.nbd_wire import (
    CMD_FLAG_FUA,
    BlockStatusReply,
    Closed,
    Cmd,
    Done,
    Errno,
    ErrorReply,
    Negotiated,
    ReadReply,
    Request,
    StartTLS,
)
from edgevisor.storage.blockdev import BlockDevice
from edgevisor.storage.nbd_session_parts import Catalog, block_status, errno_for, peer_cn
from edgevisor.storage.nbd_tls_session import TLSSession

if TYPE_CHECKING:
    from edgevisor.storage.nbd_server import Export, NBDServer

log = logging.getLogger(__name__)

T = TypeVar("T")

_RECV = 1 << 20
_BATCH_MAX = 64 * 1024
_SENDFILE_MIN = 32 * 1024  # smaller reads: one pread + one send is cheaper
_HIGH_WATER = 16 << 20
_LOW_WATER = 4 << 20


class _FileChunk:
    __slots__ = ("fd", "left", "offset")

    def __init__(self, fd: int, offset: int, left: int) -> None:
        self.fd, self.offset, self.left = fd, offset, left


class Conn(asyncio.BufferedProtocol):
    """A server session (see the module docstring)."""

    def __init__(self, server: NBDServer, sock: socket.socket) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.sock = sock
        self.fd = sock.fileno()
        self.catalog = Catalog(server)
        self.core = ServerConnection(
            self.catalog, tls=server.tls_policy(), max_payload=server.max_payload, zero_copy=True
        )
        self.transport: asyncio.Transport | None = None  # set once TLS is up
        self.export: Export | None = None
        self.contexts: dict[int, str] = {}
        # The device's optional fast paths, looked up once per session (hot path).
        self.file_extent: Callable[[int, int], tuple[int, int] | None] | None = None
        self.write_nowait: Callable[[int, bytes | memoryview], bool] | None = None
        self._tls_session: TLSSession | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        # Devices live on the server's main loop; this session may run on a worker loop.
        self.device_loop = server.main_loop or self.loop
        self.finished: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._wq: collections.deque[memoryview | _FileChunk] = collections.deque()
        self._wq_bytes = 0
        self._reading = False
        self._writing = False
        self._closing = False
        self._dead = False
        self._tls_pending = False
        self._batch: list[bytes | bytearray | memoryview] | None = None

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self.sock.setblocking(False)
        if self.sock.family != socket.AF_UNIX:  # a unix socket has no Nagle to turn off
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server._conns.add(self)
        self._resume_reading()
        self.write(self.core.data_to_send())

    def abort(self) -> None:
        if self._tls_session is not None:
            self._tls_session.close()
        elif self.transport is not None:
            self.transport.abort()
        else:
            self._teardown()

    def _teardown(self) -> None:
        if self._dead:
            return
        self._dead = True
        self._pause_reading()
        if self._writing:
            self.loop.remove_writer(self.fd)
            self._writing = False
        self._wq.clear()
        self.sock.close()
        self._finish()

    def _finish(self) -> None:
        self.server._conns.discard(self)
        for t in self.tasks:
            t.cancel()
        if not self.finished.done():
            self.finished.set_result(None)

    # ------------------------------------------------------------ raw socket I/O

    def _pause_reading(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()
        elif self._reading:
            self.loop.remove_reader(self.fd)
            self._reading = False

    def _resume_reading(self) -> None:
        if self._closing or self._dead or self._tls_pending:
            return
        if self.transport is not None:
            self.transport.resume_reading()
        elif not self._reading:
            self.loop.add_reader(self.fd, self._on_readable)
            self._reading = True

    def _on_readable(self) -> None:
        try:
            n = self.sock.recv_into(self.core.get_buffer(_RECV))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._teardown()
            return
        if n == 0:
            self._pause_reading()
            self.core.receive_data(b"")
        else:
            self.core.buffer_updated(n)
        self._process()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data or self._dead:
            return
        if self._batch is not None and len(data) < _BATCH_MAX:
            # Inside _process: small replies leave in one send (a syscall per 16-byte
            # reply costs more than the copy).
            self._batch.append(data)
            return
        self._flush_batch()
        self._send(data)

    def _flush_batch(self, more: bool = False) -> None:
        batch = self._batch
        if batch:
            self._batch = []
            self._send(b"".join(batch) if len(batch) > 1 else batch[0], more)

    def _send(self, data: bytes | bytearray | memoryview, more: bool = False) -> None:
        if self.transport is not None:
            if not self.transport.is_closing():
                self.transport.write(data)
            return
        n = 0
        if not self._wq:
            try:
                # MSG_MORE: a reply header waits for its sendfile payload (one segment).
                n = self.sock.send(data, socket.MSG_MORE if more else 0)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError:
                self._teardown()
                return
            if n == len(data):
                return
        mv = memoryview(data)[n:]
        self._enqueue(mv, len(mv))

    def write_file(self, fd: int, offset: int, length: int) -> None:
        """Send ``length`` bytes of a file (sendfile on plain TCP, copied under TLS)."""
        if self._dead:
            return
        self._flush_batch(more=True)
        if self.transport is not None:
            self._send(os.pread(fd, length, offset))
            return
        chunk = _FileChunk(fd, offset, length)
        if not self._wq and not self._sendfile(chunk):
            return
        if not self._dead:
            self._enqueue(chunk, chunk.left)

    def _sendfile(self, c: _FileChunk) -> bool:
        """Send what the socket takes now; True if some is left."""
        while c.left:
            try:
                n = os.sendfile(self.fd, c.fd, c.offset, c.left)
            except (BlockingIOError, InterruptedError):
                return True
            except OSError:
                self._teardown()
                return False
            if n == 0:  # file shorter than promised: the session cannot continue
                self._teardown()
                return False
            c.offset += n
            c.left -= n
        return False

    def _enqueue(self, item: memoryview | _FileChunk, n: int) -> None:
        self._wq.append(item)
        self._wq_bytes += n
        if not self._writing:
            self.loop.add_writer(self.fd, self._on_writable)
            self._writing = True
        if self._wq_bytes > _HIGH_WATER:
            self._pause_reading()

    def _on_writable(self) -> None:
        while self._wq:
            item = self._wq[0]
            if isinstance(item, _FileChunk):
                before = item.left
                more = self._sendfile(item)
                self._wq_bytes -= before - item.left
                if self._dead:
                    return
                if more:
                    return
            else:
                # A reply header whose payload follows from the file: one segment.
                more = len(self._wq) > 1 and isinstance(self._wq[1], _FileChunk)
                try:
                    n = self.sock.send(item, socket.MSG_MORE if more else 0)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError:
                    self._teardown()
                    return
                self._wq_bytes -= n
                if n < len(item):
                    self._wq[0] = item[n:]
                    return
            self._wq.popleft()
        self.loop.remove_writer(self.fd)
        self._writing = False
        if self._tls_pending:
            self._spawn(self._start_tls())
        elif self._closing:
            self._teardown()
        elif self._wq_bytes < _LOW_WATER:
            self._resume_reading()

    # ------------------------------------------------------------ TLS transport

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.core.get_buffer(_RECV)

    def buffer_updated(self, nbytes: int) -> None:
        self.core.buffer_updated(nbytes)
        self._process()

    def eof_received(self) -> bool:
        self.core.receive_data(b"")
        self._process()
        return False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._tls_pending = False
        self.catalog.tls = True
        self.catalog.peer_cn = peer_cn(transport.get_extra_info("ssl_object"))
        self.core.tls_started()
        self._process()

    def connection_lost(self, exc: Exception | None) -> None:
        self._dead = True
        self._finish()

    def pause_writing(self) -> None:
        self._pause_reading()

    def resume_writing(self) -> None:
        self._resume_reading()

    async def _start_tls(self) -> None:
        ctx = self.server.ssl_context
        assert ctx is not None
        if self._wq or self._dead:  # the STARTTLS ack is still queued: wait for _on_writable
            return
        self._pause_reading()
        sock = self.sock
        if self.server.tls_threads:
            # The session thread owns the socket from here (TLS handshake included).
            self._tls_session = TLSSession(self, sock, ctx)
            self._tls_session.start()
            return
        # Hand the socket over: asyncio owns it from here (TLS handshake included).
        try:
            await self.loop.connect_accepted_socket(lambda: self, sock=sock, ssl=ctx)
        except (OSError, ssl.SSLError, ConnectionError, TimeoutError) as e:
            log.info("nbd TLS handshake failed: %s", e)
            self._dead = True
            sock.close()
            self._finish()

    # ------------------------------------------------------------ for the TLS thread

    def negotiated(self, ev: Negotiated) -> bool:
        """The session entered transmission on ``ev``'s export; False if it is gone."""
        self.export = self.server.exports.get(ev.export.name)
        self.contexts = ev.contexts
        if self.export is None:
            return False
        dev = self.export.device
        # The device's optional fast paths, looked up once per session (hot path).
        self.file_extent = getattr(dev, "file_extent", None)
        self.write_nowait = getattr(dev, "write_nowait", None)
        return True

    def tls_up(self, sock: ssl.SSLSocket) -> None:
        """On the session thread: the TLS handshake is done (the peer is known now)."""
        self._tls_pending = False
        self.catalog.tls = True
        self.catalog.peer_cn = peer_cn(sock)
        self.core.tls_started()

    def run_on_device(
        self, req: Request
    ) -> concurrent.futures.Future[ReadReply | Done | ErrorReply | BlockStatusReply]:
        """Perform ``req`` on the device's loop (from any thread)."""
        export = self.export
        if export is None:  # removed meanwhile; the TLS session answers ESHUTDOWN
            raise RuntimeError("export removed")
        return asyncio.run_coroutine_threadsafe(self._perform(export.device, req), self.device_loop)

    def finish_threadsafe(self) -> None:
        """The TLS thread ended: the server forgets the session (from any thread)."""
        self._dead = True
        self.server._conns.discard(self)
        with contextlib.suppress(RuntimeError):  # the loop is closed: nothing runs there
            self.loop.call_soon_threadsafe(self._cancel_tasks)
        with contextlib.suppress(concurrent.futures.InvalidStateError):
            self.finished.set_result(None)

    def _cancel_tasks(self) -> None:
        for t in self.tasks:
            t.cancel()

    # ------------------------------------------------------------ protocol

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        t = asyncio.create_task(coro)
        self.tasks.add(t)
        t.add_done_callback(self.tasks.discard)

    def _process(self) -> None:
        self._batch = []
        try:
            self._process_events()
        finally:
            self._flush_batch()
            self._batch = None

    def _process_events(self) -> None:
        core = self.core
        while not self._dead:
            ev = core.next_event()
            out = core.data_to_send()
            if out:
                self.write(out)
            if ev is None:
                return
            if type(ev) is Request:
                self._dispatch(ev)
                if not core.buffered():
                    # Nothing else arrived: the replies leave now, before the bookkeeping
                    # (a QD1 client waits for exactly this send).
                    self._flush_batch()
            elif isinstance(ev, Negotiated):
                if not self.negotiated(ev):  # removed in between
                    self.abort()
                    return
            elif isinstance(ev, StartTLS):
                # The ClientHello must reach the TLS layer, not our buffer.
                self._tls_pending = True
                self._pause_reading()
                self._spawn(self._start_tls())
                return
            elif isinstance(ev, Closed):
                log.debug("nbd session closed: %s", ev.reason)
                self._closing = True
                self._pause_reading()
                self._spawn(self._close_after_inflight())
                return

    async def _close_after_inflight(self) -> None:
        current = asyncio.current_task()
        pending = [t for t in self.tasks if t is not current]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        if self.transport is not None:
            self.transport.close()
        elif not self._wq:
            self._teardown()
        # else: _on_writable tears down once the queue is empty

    def _dispatch(self, req: Request) -> None:
        """Answer inline when the device can do it without waiting; else start a task."""
        export = self.export
        if export is None:  # removed (NBDServer.remove_export): nothing more is served
            self.abort()
            return
        dev = export.device
        if self.answer_inline(req, self._read_from_file, self.write):
            return
        if isinstance(req.data, memoryview):  # the view dies with the next receive
            req = dataclasses.replace(req, data=bytes(req.data))
        self._spawn(self._handle(dev, req))

    def answer_inline(
        self,
        req: Request,
        read_from_file: Callable[[Request, int, int], None],
        send: Callable[[bytes], None],
    ) -> bool:
        """Answer ``req`` on the session's own thread of control when the device offers a
        fast path for it (a file extent to read, a write that completes at once), or
        when that fast path fails; False when the device must handle it. Shared by the
        asyncio sessions and the TLS session threads."""
        try:
            if req.cmd is Cmd.READ:
                file_extent = self.file_extent
                ext = file_extent(req.offset, req.length) if file_extent is not None else None
                if ext is not None:
                    read_from_file(req, ext[0], ext[1])
                    return True
            elif req.cmd is Cmd.WRITE and not req.flags & CMD_FLAG_FUA:
                write_nowait = self.write_nowait
                if write_nowait is not None and write_nowait(req.offset, req.data):
                    send(self.core.send(Done(req.handle)))
                    return True
        except (EdgevisorError, OSError) as e:
            send(self.core.send(ErrorReply(req.handle, errno_for(e), str(e)[:200])))
            return True
        return False

    def _read_from_file(self, req: Request, fd: int, offset: int) -> None:
        if self.transport is None and req.length >= _SENDFILE_MIN:
            hdr = self.core.read_reply_header(req.handle)
            if self._batch is not None:
                self._batch.append(hdr)  # goes out with MSG_MORE right before the payload
            else:
                self._send(hdr, more=True)
            self.write_file(fd, offset, req.length)
            return
        if req.length >= _SENDFILE_MIN:
            # Large reads over TLS (a fill): header, then the bytes as pread returns
            # them (a reply frame would be zeroed first: a memset per MiB, for nothing).
            data = os.pread(fd, req.length, offset)
            if len(data) != req.length:
                self.abort()  # the file is shorter than the export: cannot answer
                return
            self.write(self.core.read_reply_header(req.handle))
            self.write(data)
            return
        # Small reads (the QD1 latency case): pread straight into the reply frame, then
        # one send of header and payload together.
        frame, start = self.core.read_reply_frame(req.handle)
        got = os.preadv(fd, [memoryview(frame)[start:]], offset)
        if got != req.length:
            self.abort()  # the header already promises the bytes: cannot answer now
            return
        self.write(frame)

    async def _on_device_loop(self, coro: Coroutine[Any, Any, T]) -> T:
        if self.device_loop is self.loop:
            return await coro
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.device_loop))

    async def _handle(self, dev: BlockDevice, req: Request) -> None:
        try:
            reply = await self._on_device_loop(self._perform(dev, req))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.exception("nbd request %s failed", req.cmd.name)
            reply = ErrorReply(req.handle, Errno.EIO, type(e).__name__)
        self.write(self.core.send(reply))

    async def _perform(
        self, dev: BlockDevice, req: Request
    ) -> ReadReply | Done | ErrorReply | BlockStatusReply:
        """Run one request against the device (on the device's loop) and build the reply."""
        try:
            reply: ReadReply | Done | ErrorReply | BlockStatusReply
            if req.cmd is Cmd.READ:
                reply = ReadReply(req.handle, await dev.read(req.offset, req.length))
            elif req.cmd is Cmd.WRITE:
                assert isinstance(req.data, bytes)
                await dev.write(req.offset, req.data, fua=req.fua)
                reply = Done(req.handle)
            elif req.cmd is Cmd.WRITE_ZEROES:
                await dev.write_zeroes(req.offset, req.length, fua=req.fua)
                reply = Done(req.handle)
            elif req.cmd is Cmd.TRIM:
                await dev.trim(req.offset, req.length)
                if req.fua:
                    await dev.flush()
                reply = Done(req.handle)
            elif req.cmd is Cmd.FLUSH:
                await dev.flush()
                reply = Done(req.handle)
            elif req.cmd is Cmd.BLOCK_STATUS:
                reply = BlockStatusReply(req.handle, block_status(dev, self.contexts, req))
            else:  # the core only emits the commands above
                reply = ErrorReply(req.handle, Errno.EINVAL)
        except asyncio.CancelledError:
            raise
        except (EdgevisorError, OSError) as e:
            reply = ErrorReply(req.handle, errno_for(e), str(e)[:200])
        except Exception as e:
            log.exception("nbd request %s failed", req.cmd.name)
            reply = ErrorReply(req.handle, Errno.EIO, type(e).__name__)
        return reply

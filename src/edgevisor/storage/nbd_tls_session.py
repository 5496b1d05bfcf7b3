"""An NBD server session after ``STARTTLS``, on a thread of its own with a blocking socket.

Why a thread: asyncio's TLS transport pushes every record through a memory BIO and Python
code (copy in, ``SSLObject.read``, copy out, and the same on the way back); for bulk
reads (a migration's fill) that costs more CPU than the encryption itself and holds the
GIL. A blocking ``SSLSocket`` encrypts and sends straight from our buffer in
``SSL_write`` and decrypts straight into the core's buffer in ``SSL_read``, both without
the GIL, so sessions on threads use several cores and leave the event loops alone.

The session continues over the same sans-IO core (:class:`~edgevisor.proto.nbd.
ServerConnection`) the plain session (:class:`~edgevisor.storage.nbd_conn.Conn`) drove
until ``STARTTLS``; everything on the socket and in the core happens on this thread:

* **fast paths** run here: a READ the device can serve from a file (``file_extent``) is
  ``preadv`` into a per-session frame behind its reply header and sent in one
  ``sendall`` (``sendfile`` cannot go through TLS); a WRITE the device takes without
  waiting (``write_nowait``) is acknowledged at once. Small replies are batched into one
  send per burst of requests.
* **other requests** (flush, FUA writes, block status, a lazy volume's remote fetch) run
  on the device's event loop (``run_coroutine_threadsafe``); their replies come back
  through a queue and a wake-up socket the thread polls next to the TLS socket, so
  requests stay pipelined and replies go out in completion order.

Lifecycle: handshake (bounded by ``HANDSHAKE_TIMEOUT_S``) → serve → end, on the client's
disconnect (after the requests in flight were answered), an error, or :meth:`close` from
any thread (``shutdown`` unblocks the thread; only the thread closes the file
descriptors, so no descriptor is reused under it). At the end the session's requests
still on the device loop are cancelled and the server is told (``Conn.finish_threadsafe``).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import logging
import os
import queue
import select
import socket
import ssl
import threading
from typing import TYPE_CHECKING

from edgevisor.proto.nbd_wire import (
    BlockStatusReply,
    Closed,
    Done,
    Errno,
    ErrorReply,
    Negotiated,
    ReadReply,
    Request,
    StartTLS,
)

if TYPE_CHECKING:
    from edgevisor.storage.nbd_conn import Conn

__all__ = ["HANDSHAKE_TIMEOUT_S", "TLSSession"]

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT_S = 30.0
_RECV = 1 << 20
_SMALL = 64 * 1024  # replies below this are batched into one send
_Reply = ReadReply | Done | ErrorReply | BlockStatusReply


class TLSSession:
    """See the module docstring. Created by the plain session once its STARTTLS
    acknowledgement left; :meth:`start` takes the socket over."""

    def __init__(self, conn: Conn, sock: socket.socket, ctx: ssl.SSLContext) -> None:
        self.conn = conn
        self.core = conn.core
        self._raw = sock
        self._ctx = ctx
        self._ssock: ssl.SSLSocket | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._replies: queue.SimpleQueue[tuple[int, concurrent.futures.Future[_Reply]]] = (
            queue.SimpleQueue()
        )
        self._inflight: dict[int, concurrent.futures.Future[_Reply]] = {}
        self._out: list[bytes | bytearray | memoryview] = []
        self._frame: bytearray | None = None
        self._closing = False  # the client said goodbye: answer what is in flight, end
        self._stop = threading.Event()
        self._fd = sock.fileno()  # the same descriptor before and after wrapping
        self._fd_lock = threading.Lock()
        self._fds_closed = False
        self._thread = threading.Thread(target=self._run, name="nbd-tls", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """End the session from any thread (idempotent): the thread unblocks and ends."""
        self._stop.set()
        with self._fd_lock:
            if self._fds_closed:
                return
            # shutdown() of the SSLSocket object itself would drop its SSL state under
            # the thread; a duplicate descriptor shuts the same connection down.
            with contextlib.suppress(OSError), socket.socket(fileno=os.dup(self._fd)) as d:
                d.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                self._wake_w.send(b"x")

    # ------------------------------------------------------------ the thread

    def _run(self) -> None:
        try:
            self._handshake()
            self._serve()
        except (OSError, EOFError) as e:  # ssl.SSLError, timeouts and resets are OSErrors
            if not self._stop.is_set():
                log.info("nbd TLS session ended: %s", e)
        except Exception:
            log.exception("nbd TLS session failed")
        finally:
            self._end()

    def _handshake(self) -> None:
        raw = self._raw
        raw.setblocking(True)
        raw.settimeout(HANDSHAKE_TIMEOUT_S)
        if self._stop.is_set():
            raise EOFError("closed before the TLS handshake")
        self._ssock = self._ctx.wrap_socket(raw, server_side=True)
        self._ssock.settimeout(None)
        self.conn.tls_up(self._ssock)
        self._queue(self.core.data_to_send())
        self._process()

    def _serve(self) -> None:
        ssock = self._ssock
        assert ssock is not None
        poller = select.poll()
        poller.register(ssock.fileno(), select.POLLIN)
        poller.register(self._wake_r.fileno(), select.POLLIN)
        replies_only = select.poll()  # after the client's goodbye: nothing more is read
        replies_only.register(self._wake_r.fileno(), select.POLLIN)
        wake_fd = self._wake_r.fileno()
        core = self.core
        while not self._stop.is_set():
            if self._closing:
                if not self._inflight:
                    return
                replies_only.poll()
                self._on_wake()
                continue
            if not ssock.pending():
                events = poller.poll()
                if any(fd == wake_fd for fd, _ in events):
                    self._on_wake()
                if not any(fd != wake_fd for fd, _ in events):
                    continue
            n = ssock.recv_into(core.get_buffer(_RECV))
            if n == 0:
                core.receive_data(b"")
            else:
                core.buffer_updated(n)
            self._process()

    def _on_wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            self._wake_r.recv(4096)
        self._send_replies()
        self._flush()

    def _end(self) -> None:
        for fut in self._inflight.values():
            fut.cancel()
        self._inflight.clear()
        with self._fd_lock:
            self._fds_closed = True
            s = self._ssock if self._ssock is not None else self._raw
            with contextlib.suppress(OSError):
                s.close()
            with contextlib.suppress(OSError):
                self._raw.close()  # detached once wrapped: a no-op then
            self._wake_r.close()
            self._wake_w.close()
        self.conn.finish_threadsafe()

    # ------------------------------------------------------------ protocol

    def _process(self) -> None:
        core = self.core
        while not self._stop.is_set():
            ev = core.next_event()
            self._queue(core.data_to_send())
            if ev is None:
                break
            if type(ev) is Request:
                self._dispatch(ev)
                if not core.buffered():
                    self._flush()
            elif isinstance(ev, Negotiated):
                if not self.conn.negotiated(ev):
                    raise EOFError(f"export {ev.export.name!r} removed")
            elif isinstance(ev, Closed):
                log.debug("nbd TLS session closed: %s", ev.reason)
                self._closing = True
                break
            elif isinstance(ev, StartTLS):  # the core refuses a second STARTTLS itself
                break
        self._flush()
        if self._closing and not self._inflight:
            self._stop.set()

    def _dispatch(self, req: Request) -> None:
        conn = self.conn
        export = conn.export
        if export is None:
            raise EOFError("export removed")
        if conn.answer_inline(req, self._read_from_file, self._queue):
            return
        if isinstance(req.data, memoryview):  # the view dies with the next receive
            req = dataclasses.replace(req, data=bytes(req.data))
        try:
            fut = conn.run_on_device(req)
        except RuntimeError:  # the device loop is gone: the server is closing
            self._queue(self.core.send(ErrorReply(req.handle, Errno.ESHUTDOWN)))
            return
        self._inflight[req.handle] = fut
        fut.add_done_callback(functools.partial(self._reply_ready, req.handle))

    def _reply_ready(self, handle: int, fut: concurrent.futures.Future[_Reply]) -> None:
        """On the device loop: hand the finished request to the session thread."""
        self._replies.put((handle, fut))
        with self._fd_lock:
            if not self._fds_closed:
                with contextlib.suppress(OSError):  # full: a wake-up is pending anyway
                    self._wake_w.send(b"x")

    def _send_replies(self) -> None:
        while True:
            try:
                handle, fut = self._replies.get_nowait()
            except queue.Empty:
                return
            if self._inflight.pop(handle, None) is None:
                continue
            reply: _Reply
            if fut.cancelled():
                reply = ErrorReply(handle, Errno.ESHUTDOWN)
            elif (exc := fut.exception()) is not None:
                log.error("nbd request failed", exc_info=exc)
                reply = ErrorReply(handle, Errno.EIO, type(exc).__name__)
            else:
                reply = fut.result()
            self._queue(self.core.send(reply))
        if self._closing and not self._inflight:
            self._stop.set()

    def _read_from_file(self, req: Request, fd: int, offset: int) -> None:
        n = req.length
        if n < _SMALL:
            frame, start = self.core.read_reply_frame(req.handle)
            if os.preadv(fd, [memoryview(frame)[start:]], offset) != n:
                raise EOFError("the file is shorter than the export")
            self._queue(frame)
            return
        # A bulk read (a fill): header and bytes in one reused frame, one sendall (one
        # pass of SSL_write over it; no per-reply allocation or zeroing).
        hdr = self.core.read_reply_header(req.handle)
        h = len(hdr)
        if self._frame is None or len(self._frame) < h + n:
            self._frame = bytearray(h + n)
        self._frame[:h] = hdr
        view = memoryview(self._frame)
        if os.preadv(fd, [view[h : h + n]], offset) != n:
            raise EOFError("the file is shorter than the export")
        self._flush()
        self._sendall(view[: h + n])

    # ------------------------------------------------------------ output

    def _queue(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        if len(data) >= _SMALL:
            self._flush()
            self._sendall(data)
        else:
            self._out.append(data)

    def _flush(self) -> None:
        out = self._out
        if out:
            self._out = []
            self._sendall(b"".join(out) if len(out) > 1 else out[0])

    def _sendall(self, data: bytes | bytearray | memoryview) -> None:
        assert self._ssock is not None
        self._ssock.sendall(data)

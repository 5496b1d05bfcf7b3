"""A blocking NBD reader over the sans-IO core, for one thread (a lazy volume's fill lane).

Why blocking: a fill lane owns its thread and does one thing, bulk reads. A blocking
socket needs no event loop, no self-pipe wake-ups and no transport buffers; over TLS,
``SSLSocket.recv_into`` decrypts straight into the destination buffer (asyncio's TLS
transport first copies every record into a memory BIO). The payload of each read lands
where the caller wants it through the core's zero-copy sink
(:meth:`~edgevisor.proto.nbd_client_core.ClientConnection.send` with ``into``).

Pipelining: :meth:`BlockingReader.submit` sends a read and returns at once,
:meth:`BlockingReader.receive` waits for whichever submitted read completes next (replies
are matched by handle, :mod:`edgevisor.proto.nbd_pipeline`), so a caller keeps several
reads in flight on one connection and the server never waits for the next request.
:meth:`BlockingReader.read_into` is one read, waited for.

Errors: anything that breaks the link (OS errors, timeouts, TLS errors, protocol
violations, a refused handshake) raises :class:`~edgevisor.errors.PeerUnavailable`, after
which the reader is closed and :meth:`BlockingReader.abandoned` names the reads that were
in flight; a server's error reply to a read is a
:class:`~edgevisor.storage.nbd_client.NBDCommandError` for that read only.
"""

from __future__ import annotations

import contextlib
import socket

from edgevisor.errors import PeerUnavailable
from edgevisor.proto.nbd import ClientConnection
from edgevisor.proto.nbd_pipeline import PipeWindow
from edgevisor.proto.nbd_wire import (
    Closed,
    Cmd,
    Command,
    ExportList,
    HandshakeFailed,
    NBDProtocolError,
    Negotiated,
    Reply,
    StartTLS,
)
from edgevisor.storage.nbd_client import Endpoint, NBDCommandError

__all__ = ["BlockingReader"]

_RECV_MIN = 256 * 1024


class BlockingReader:
    """One connection, read-only use, driven by blocking calls from one thread at a time.

    :meth:`close` may be called from another thread to unblock a read in progress.
    """

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self._core = ClientConnection(
            endpoint.export, contexts=(), tls=endpoint.ssl_context is not None
        )
        # Unbounded here: the caller (a fill lane) keeps its own window's depth.
        self._window = PipeWindow(1 << 30)
        self._closed = False
        self._sock: socket.socket = self._open()
        try:
            self._handshake()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------ setup

    def _open(self) -> socket.socket:
        ep = self.endpoint
        try:
            if ep.unix_path:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.settimeout(ep.timeout_s)
                s.connect(ep.unix_path)
            else:
                s = socket.create_connection((ep.host, ep.port), timeout=ep.timeout_s)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as e:
            raise PeerUnavailable(f"cannot connect to nbd://{ep.host}:{ep.port}: {e}") from e
        return s

    def _handshake(self) -> None:
        core = self._core
        try:
            while True:
                ev = core.next_event()
                out = core.data_to_send()
                if out:
                    self._sock.sendall(out)
                if ev is None:
                    core.receive_data(self._sock.recv(65536))
                elif isinstance(ev, StartTLS):
                    ctx = self.endpoint.ssl_context
                    if ctx is None:
                        raise PeerUnavailable("STARTTLS without an ssl context")
                    self._sock = ctx.wrap_socket(
                        self._sock, server_hostname=self.endpoint.server_hostname
                    )
                    core.tls_started()
                elif isinstance(ev, Negotiated):
                    self.size_bytes = ev.export.size
                    self.max_payload = ev.export.block_sizes[2]
                    return
                elif isinstance(ev, HandshakeFailed):
                    raise PeerUnavailable(f"nbd handshake refused: {ev.message}")
                elif isinstance(ev, (Closed, ExportList)):
                    raise PeerUnavailable(f"nbd handshake ended: {ev}")
        except (OSError, NBDProtocolError) as e:  # ssl.SSLError and timeouts are OSErrors
            raise PeerUnavailable(f"nbd handshake with {self.endpoint.host} failed: {e}") from e

    def close(self) -> None:
        """Idempotent; from any thread (a blocked read then fails with PeerUnavailable)."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self._sock.close()

    # ------------------------------------------------------------ reads

    @property
    def in_flight(self) -> int:
        """Reads submitted whose completion :meth:`receive` has not returned yet."""
        return len(self._window)

    def submit(self, offset: int, buf: memoryview | bytearray) -> int:
        """Send a read of ``len(buf)`` bytes at ``offset`` into ``buf`` without waiting
        for its reply (pieces larger than the server's maximum payload are separate
        commands); returns its ticket for :meth:`receive`. ``buf`` must stay untouched
        until the read completed or the reader is closed."""
        view = memoryview(buf).cast("B")
        if not view:
            raise ValueError("an empty read")
        if self._closed:
            raise PeerUnavailable("nbd connection closed")
        step = self.max_payload
        offsets = list(range(offset, offset + len(view), step))
        ticket, handles = self._window.add(offsets)
        try:
            out = bytearray()
            for o, h in zip(offsets, handles, strict=True):
                n = min(step, offset + len(view) - o)
                rel = o - offset
                out += self._core.send(Command(h, Cmd.READ, o, n), into=view[rel : rel + n])
            self._sock.sendall(out)
        except (OSError, NBDProtocolError) as e:
            self.close()
            raise PeerUnavailable(f"nbd connection lost: {e}") from e
        except BaseException:
            self.close()
            raise
        return ticket

    def receive(self) -> tuple[int, NBDCommandError | None]:
        """Wait until one submitted read completed (in the server's order): its ticket,
        and the server's error reply to it (None: its buffer is complete). An error
        reply fails only that read; the connection goes on. A broken link raises
        PeerUnavailable (the reader is closed; :meth:`abandoned` names the reads lost)."""
        if not self._window:
            raise RuntimeError("receive() with no read in flight")
        if self._closed:
            raise PeerUnavailable("nbd connection closed")
        try:
            while True:
                ev = self._core.next_event()
                if ev is None:
                    self._receive()
                elif isinstance(ev, Reply):
                    done = self._window.reply(ev.handle, ev.error, ev.message)
                    if done is None:
                        continue
                    if not done.error:
                        return done.ticket, None
                    msg = f"READ at {done.error_offset} failed: error {done.error}"
                    err = NBDCommandError(f"{msg} {done.message}".rstrip(), errno=done.error)
                    return done.ticket, err
                elif isinstance(ev, Closed):
                    raise PeerUnavailable(f"nbd connection lost: {ev.reason}")
        except PeerUnavailable:
            self.close()
            raise
        except (OSError, NBDProtocolError) as e:
            self.close()
            raise PeerUnavailable(f"nbd connection lost: {e}") from e
        except BaseException:
            self.close()
            raise

    def abandoned(self) -> list[int]:
        """Tickets of the reads in flight when the link broke (oldest first); they are
        forgotten here, so each is reported once."""
        return self._window.drain()

    def read_into(self, offset: int, buf: memoryview | bytearray) -> None:
        """Read ``len(buf)`` bytes at ``offset`` into ``buf`` and wait for them (pieces
        are pipelined). With nothing else in flight only; an error reply closes the
        reader (a caller that gives up on a read must not reuse its buffer)."""
        if self._window:
            raise RuntimeError("read_into() while pipelined reads are in flight")
        if not len(buf):
            return
        self.submit(offset, buf)
        _, err = self.receive()
        if err is not None:
            self.close()
            raise err

    def _receive(self) -> None:
        """Receive once: into the core's buffer, or (a read's payload) until the
        payload's piece of its destination is full."""
        target = self._core.get_buffer(_RECV_MIN)
        if not self._core.sinking:
            n = self._sock.recv_into(target)
            if n == 0:  # every caller is waiting for a reply: the link is gone
                raise PeerUnavailable("nbd connection lost: server closed the connection")
            self._core.buffer_updated(n)
            return
        # A payload's destination (the core's zero-copy sink): fill it in a tight loop
        # (over TLS each recv_into yields one 16 KiB record; going through the core for
        # each costs more than the decryption).
        recv_into = self._sock.recv_into
        got, want = 0, len(target)
        while got < want:
            n = recv_into(target[got:])
            if n == 0:
                raise PeerUnavailable("nbd connection lost: server closed the connection")
            got += n
        self._core.buffer_updated(got)

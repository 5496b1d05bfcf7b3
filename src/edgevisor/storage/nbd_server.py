"""asyncio NBD server exporting named block devices over the sans-IO core.

Sessions live in :mod:`edgevisor.storage.nbd_conn` (socket I/O with few copies around
:class:`~edgevisor.proto.nbd.ServerConnection`). A device may offer two optional fast
paths the sessions use when present: ``file_extent(offset, length) -> (fd, file_offset)
| None`` (bytes readable straight from a file: replies use ``sendfile``) and
``write_nowait(offset, data) -> bool`` (a write that completes without waiting).

Metadata contexts: ``base:allocation`` (holes from the device's ``allocated``) and
``edgevisor:sync`` (bit 0 set = block missing locally, from the device's ``present``).

Authentication: Python 3.11's :mod:`ssl` cannot do TLS-PSK (3.13 adds it), so an export
that needs protection sets ``allowed_peers``: the server requires TLS (``STARTTLS`` with
a certificate chain and ``CERT_REQUIRED`` against the fleet CA) and only a client whose
certificate subject CN is in ``allowed_peers`` can see or open the export. Plain TCP stays
available for exports without ``allowed_peers`` (loopback tests with the real tools).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import threading
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from edgevisor.errors import AlreadyExists
from edgevisor.proto.nbd import TLSPolicy
from edgevisor.proto.nbd_wire import (
    CTX_BASE_ALLOCATION,
    CTX_EDGEVISOR_SYNC,
    DEFAULT_MAX_PAYLOAD,
    ExportInfo,
)
from edgevisor.storage.blockdev import BlockDevice
from edgevisor.storage.nbd_conn import Conn

__all__ = ["BULK_CIPHERS", "Export", "NBDServer", "NBDServerSettings", "bulk_cipher_context"]

log = logging.getLogger(__name__)


BULK_CIPHERS = "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256"
"""AEAD suites with ECDHE forward secrecy, like TLS 1.3's, with a 128-bit AES key."""


def bulk_cipher_context(ctx: ssl.SSLContext) -> ssl.SSLContext:
    """Make a server context (of the NBD data link only) negotiate TLS 1.2 with
    AES-128-GCM and ECDHE: both ends still authenticate with fleet certificates, the
    suite is AEAD with forward secrecy as TLS 1.3's, with 10 AES rounds instead of 14.
    (Python 3.11 cannot choose TLS 1.3 suites, so a cheaper suite means TLS 1.2.)"""
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(BULK_CIPHERS)
    return ctx


class NBDServerSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    listen_host: str = Field("127.0.0.1", description="Address the NBD endpoint listens on.")
    listen_port: int = Field(10809, ge=0, le=65535, description="TCP port of the NBD endpoint.")
    max_payload_bytes: int = Field(
        DEFAULT_MAX_PAYLOAD, ge=4096, description="Largest read/write request accepted."
    )
    tls_cert_file: str | None = Field(None, description="PEM certificate chain of this host.")
    tls_key_file: str | None = Field(None, description="PEM private key of this host.")
    tls_ca_file: str | None = Field(
        None, description="PEM CA that signs peer certificates (client certs are required)."
    )
    worker_threads: int = Field(
        2, ge=0, le=64, description="Extra event-loop threads for NBD sessions (0: none)."
    )
    tls_required: bool = Field(
        False, description="Refuse every plain-text session (not only protected exports)."
    )

    def ssl_context(self) -> ssl.SSLContext | None:
        """Server-side TLS context requiring client certificates, or None without certs."""
        if not self.tls_cert_file or not self.tls_key_file:
            return None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.tls_cert_file, self.tls_key_file)
        if self.tls_ca_file:
            ctx.load_verify_locations(self.tls_ca_file)
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx


@dataclass
class Export:
    """A named device on the server; ``allowed_peers`` (cert CNs) makes it TLS-only."""

    name: str
    device: BlockDevice
    read_only: bool = False
    description: str = ""
    allowed_peers: frozenset[str] | None = None
    sync_context: bool = True

    def info(self, max_payload: int) -> ExportInfo:
        ctx = (
            (CTX_BASE_ALLOCATION, CTX_EDGEVISOR_SYNC)
            if self.sync_context
            else (CTX_BASE_ALLOCATION,)
        )
        return ExportInfo(
            name=self.name,
            size=self.device.size_bytes,
            read_only=self.read_only,
            description=self.description,
            contexts=ctx,
            block_sizes=(1, 4096, max_payload),
        )


class NBDServer:
    """Serves :class:`Export` s to NBD clients (qemu, libnbd tools, our client)."""

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext | None = None,
        tls_required: bool = False,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        workers: int = 0,
        tls_threads: bool = True,
        bulk_cipher: bool = False,
    ) -> None:
        """``workers`` > 0 runs sessions on that many extra event-loop threads: socket and
        file copies (``recv_into``, ``pwrite``, ``sendfile``) release the GIL, so several
        connections (e.g. a multi-conn ``nbdcopy``) copy in parallel. Device calls that
        must wait still run on the loop that called :meth:`start`. ``tls_threads``: each TLS
        session runs on a thread of its own with a blocking socket
        (:mod:`edgevisor.storage.nbd_tls_session`); False keeps it on asyncio's TLS
        transport (slower for bulk reads: memory BIO and per-record Python).
        ``bulk_cipher``: sessions negotiate TLS 1.2 with AES-128-GCM (see
        :func:`bulk_cipher_context`) whatever context is assigned to ``ssl_context``."""
        self.exports: dict[str, Export] = {}
        self.bulk_cipher = bulk_cipher
        self._ssl_context: ssl.SSLContext | None = None
        self.ssl_context = ssl_context
        self.tls_required = tls_required
        self.max_payload = max_payload
        self.workers = workers
        self.tls_threads = tls_threads
        self.main_loop: asyncio.AbstractEventLoop | None = None
        self._lsock: socket.socket | None = None
        self._conns: set[Conn] = set()
        self._worker_loops: list[tuple[asyncio.AbstractEventLoop, threading.Thread]] = []
        self._next_worker = 0

    @property
    def ssl_context(self) -> ssl.SSLContext | None:
        return self._ssl_context

    @ssl_context.setter
    def ssl_context(self, ctx: ssl.SSLContext | None) -> None:
        """The server's own context (an agent swaps in a new one when its certificate
        arrives); the bulk cipher policy applies to whatever is assigned."""
        if ctx is not None and self.bulk_cipher:
            bulk_cipher_context(ctx)
        self._ssl_context = ctx

    @classmethod
    def from_settings(cls, s: NBDServerSettings) -> NBDServer:
        return cls(
            ssl_context=s.ssl_context(),
            tls_required=s.tls_required,
            max_payload=s.max_payload_bytes,
            workers=s.worker_threads,
        )

    def tls_policy(self) -> TLSPolicy:
        if self.ssl_context is None:
            return TLSPolicy.OFF
        return TLSPolicy.REQUIRED if self.tls_required else TLSPolicy.OPTIONAL

    def add_export(self, export: Export) -> None:
        if export.name in self.exports:
            raise AlreadyExists(f"export {export.name!r} already exists")
        self.exports[export.name] = export

    def remove_export(self, name: str) -> None:
        """Stop offering an export; sessions already open on it are closed."""
        self.exports.pop(name, None)
        for c in list(self._conns):
            if c.export is not None and c.export.name == name:
                # At once, not when the abort runs on the session's loop: a request read
                # meanwhile must not be served from the removed export.
                c.export = None
                c.loop.call_soon_threadsafe(c.abort)

    @property
    def connections(self) -> int:
        return len(self._conns)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        """Listen; returns the bound address (port 0 picks a free one)."""
        loop = asyncio.get_running_loop()
        self.main_loop = loop
        for i in range(self.workers):
            wl = asyncio.new_event_loop()
            t = threading.Thread(target=wl.run_forever, name=f"nbd-worker-{i}", daemon=True)
            t.start()
            self._worker_loops.append((wl, t))
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, _, _, _, addr = infos[0]
        lsock = socket.socket(family, socket.SOCK_STREAM)
        try:
            lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            lsock.bind(addr)
            lsock.listen(128)
            lsock.setblocking(False)
        except BaseException:
            lsock.close()
            raise
        self._lsock = lsock
        loop.add_reader(lsock.fileno(), self._accept)
        name = lsock.getsockname()
        return name[0], name[1]

    async def start_unix(self, path: str, *, mode: int = 0o600) -> str:
        """Listen on a unix socket (replacing a stale one); only its owner may connect."""
        loop = asyncio.get_running_loop()
        self.main_loop = loop
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            old = os.umask(0o777 & ~mode)
            try:
                lsock.bind(path)
            finally:
                os.umask(old)
            lsock.listen(128)
            lsock.setblocking(False)
        except BaseException:
            lsock.close()
            raise
        self._lsock = lsock
        loop.add_reader(lsock.fileno(), self._accept)
        return path

    def _accept(self) -> None:
        assert self._lsock is not None
        for _ in range(16):
            try:
                sock, _addr = self._lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # e.g. EMFILE: keep listening, drop this one
                log.warning("nbd accept failed: %s", e)
                return
            if not self._worker_loops:
                Conn(self, sock).start()
                continue
            wl, _ = self._worker_loops[self._next_worker % len(self._worker_loops)]
            self._next_worker += 1
            wl.call_soon_threadsafe(_start_conn, self, sock)

    async def aclose(self) -> None:
        if self._lsock is not None:
            asyncio.get_running_loop().remove_reader(self._lsock.fileno())
            self._lsock.close()
            self._lsock = None
        conns = list(self._conns)
        for c in conns:
            c.loop.call_soon_threadsafe(c.abort)
        for c in conns:
            await asyncio.wrap_future(c.finished)
        for wl, t in self._worker_loops:
            wl.call_soon_threadsafe(wl.stop)
            await asyncio.to_thread(t.join)
            wl.close()
        self._worker_loops = []

    async def __aenter__(self) -> NBDServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _start_conn(server: NBDServer, sock: socket.socket) -> None:
    """Runs on a worker loop: the session binds to the loop it is created on."""
    Conn(server, sock).start()

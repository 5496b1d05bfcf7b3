"""TLS sessions on threads (nbd_tls_session): protocol over TLS, ACL, and clean ends.

The protocol tests also run with ``tls_threads=False`` (asyncio's TLS transport).

Checks what moved off asyncio: pipelined bulk and small reads, fast-path and FUA writes,
block status with both metadata contexts, the export ACL by certificate CN, and that
server close, export removal and a client stalled in the TLS handshake all end their
session threads without leaking a thread or a file descriptor.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgevisor.errors import PeerUnavailable
from edgevisor.pki import FleetCA, HostIdentity
from edgevisor.proto.nbd import ClientConnection
from edgevisor.proto.nbd_wire import CTX_BASE_ALLOCATION, CTX_EDGEVISOR_SYNC, StartTLS
from edgevisor.storage.nbd_blocking import BlockingReader
from edgevisor.storage.nbd_client import Endpoint, NBDClient, NBDCommandError
from edgevisor.storage.nbd_server import Export, NBDServer
from edgevisor.storage.volume import Volume

MiB = 1 << 20
BS = 64 * 1024
SIZE = 8 * MiB


@dataclass
class Tls:
    server: NBDServer
    port: int
    volume: Volume
    content: bytes
    client_ctx: ssl.SSLContext
    stranger_ctx: ssl.SSLContext


def _tls_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "nbd-tls"]


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def _settle(cond: object, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "not reached in time"
        await asyncio.sleep(0.02)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    ca = FleetCA.load_or_create(d / "ca")
    for host in ("source", "target", "stranger"):
        ident = HostIdentity(d / host, host)
        ident.store(ca.sign_host(host, ident.csr_pem()), ca.cert_pem)
    return d


@pytest.fixture(params=[True, False], ids=["threads", "asyncio"])
async def tls(request: pytest.FixtureRequest, pki: Path, tmp_path: Path) -> AsyncIterator[Tls]:
    vol = Volume.create(tmp_path / "v", SIZE, BS)
    content = os.urandom(SIZE - 3 * BS) + bytes(3 * BS)  # a hole at the end
    await vol.write(0, content[: SIZE - 3 * BS])
    srv = NBDServer(
        ssl_context=HostIdentity(pki / "source", "source").server_context(),
        tls_required=True,
        workers=1,
        tls_threads=request.param,
    )
    srv.add_export(Export("vol", vol, allowed_peers=frozenset({"target"})))
    _, port = await srv.start("127.0.0.1", 0)
    t = Tls(
        srv, port, vol, content,
        HostIdentity(pki / "target", "target").client_context(),
        HostIdentity(pki / "stranger", "stranger").client_context(),
    )  # fmt: skip
    try:
        yield t
    finally:
        await srv.aclose()
        vol.close()


async def _connect(t: Tls, ctx: ssl.SSLContext | None = None) -> NBDClient:
    return await NBDClient.connect(
        "127.0.0.1", t.port, "vol", ssl_context=ctx or t.client_ctx, server_hostname="source",
        contexts=(CTX_BASE_ALLOCATION, CTX_EDGEVISOR_SYNC),
    )  # fmt: skip


async def test_protocol_over_tls_session_threads(tls: Tls) -> None:
    c = await _connect(tls)
    try:
        # Pipelined: bulk reads (reused frame), small reads (batched), at once.
        offs = [(i * 997 * 4096) % (SIZE - MiB) for i in range(12)]
        bulk = await asyncio.gather(*(c.read(o, MiB) for o in offs))
        small = await asyncio.gather(*(c.read(o + 17, 4000) for o in offs))
        for o, b, s in zip(offs, bulk, small, strict=True):
            assert b == tls.content[o : o + MiB]
            assert s == tls.content[o + 17 : o + 4017]
        # Writes: the device's fast path, and FUA (on the device loop), then read back.
        await asyncio.gather(c.write(4096, b"a" * 8192), c.write(3 * MiB, b"b" * 5000, fua=True))
        await c.flush()
        assert await c.read(4096, 8192) == b"a" * 8192
        assert await c.read(3 * MiB, 5000) == b"b" * 5000
        assert await tls.volume.read(3 * MiB, 5000) == b"b" * 5000
        # Block status over TLS: the hole at the end, and nothing missing.
        ext = await c.block_status(0, SIZE)
        assert ext[-1][0] + ext[-1][1] == SIZE and ext[-1][2] != 0
        assert all(st == 0 for _, _, st in await c.block_status(0, SIZE, CTX_EDGEVISOR_SYNC))
        # Out of range: an error reply, the session goes on.
        with pytest.raises(NBDCommandError):
            await c.read(SIZE - 10, 100)
        assert await c.read(0, 10) == tls.content[:10]
        assert len(_tls_threads()) >= (1 if tls.server.tls_threads else 0)
    finally:
        await c.aclose()
    await _settle(lambda: not _tls_threads() and tls.server.connections == 0)


async def test_blocking_reader_over_tls_thread(tls: Tls) -> None:
    ep = Endpoint("127.0.0.1", tls.port, "vol", tls.client_ctx, "source")

    def read_all() -> bytes:
        r = BlockingReader(ep)
        try:
            buf = bytearray(SIZE)
            r.read_into(0, buf)  # 8 MiB: pipelined in max-payload pieces
            return bytes(buf)
        finally:
            r.close()

    assert await asyncio.to_thread(read_all) == tls.content


async def test_acl_by_certificate_cn(tls: Tls) -> None:
    with pytest.raises(PeerUnavailable):
        await _connect(tls, tls.stranger_ctx)
    with pytest.raises(PeerUnavailable):  # plain text is refused (tls_required)
        await NBDClient.connect("127.0.0.1", tls.port, "vol")
    await _settle(lambda: not _tls_threads() and tls.server.connections == 0)


def _negotiate_until_starttls(sock: socket.socket) -> None:
    """Blocking (off the loop that serves): the handshake up to the STARTTLS ack."""
    core = ClientConnection("vol", contexts=(), tls=True)
    sock.settimeout(30)
    while True:
        ev = core.next_event()
        if out := core.data_to_send():
            sock.sendall(out)
        if isinstance(ev, StartTLS):
            return
        if ev is None:
            core.receive_data(sock.recv(65536))


async def test_close_ends_sessions_without_leaks(pki: Path, tmp_path: Path) -> None:
    fds0 = _fds()
    vol = Volume.create(tmp_path / "w", SIZE, BS)
    srv = NBDServer(ssl_context=HostIdentity(pki / "source", "source").server_context(), workers=2)
    srv.add_export(Export("vol", vol, allowed_peers=frozenset({"target"})))
    _, port = await srv.start("127.0.0.1", 0)
    ctx = HostIdentity(pki / "target", "target").client_context()
    clients = [
        await NBDClient.connect("127.0.0.1", port, "vol", ssl_context=ctx, server_hostname="source")
        for _ in range(3)
    ]
    # A client that asks for STARTTLS and then never sends its ClientHello.
    stalled = socket.create_connection(("127.0.0.1", port))
    await asyncio.to_thread(_negotiate_until_starttls, stalled)
    try:
        assert await clients[0].read(0, 4) == bytes(4)
        await _settle(lambda: len(_tls_threads()) == 4)
        # Removing the export ends its sessions: a request then fails.
        srv.remove_export("vol")
        with pytest.raises((PeerUnavailable, NBDCommandError)):
            await asyncio.wait_for(clients[1].read(0, 4), 30)
        srv.add_export(Export("vol", vol, allowed_peers=frozenset({"target"})))
        c4 = await NBDClient.connect(
            "127.0.0.1", port, "vol", ssl_context=ctx, server_hostname="source"
        )
        clients.append(c4)
        assert await c4.read(0, 4) == bytes(4)
        await asyncio.wait_for(srv.aclose(), 60)  # also ends the stalled handshake
        assert srv.connections == 0
        await _settle(lambda: not _tls_threads())
    finally:
        for c in clients:
            await c.aclose()
        stalled.close()
        await srv.aclose()
        vol.close()
    await _settle(lambda: _fds() <= fds0)

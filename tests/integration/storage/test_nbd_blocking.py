"""The blocking NBD reader of the fill lanes, against our server: plain TCP and TLS,
pipelined pieces, error replies and a server that goes away."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from edgevisor.errors import PeerUnavailable
from edgevisor.pki import FleetCA, HostIdentity
from edgevisor.storage.nbd_blocking import BlockingReader
from edgevisor.storage.nbd_client import Endpoint, NBDClient, NBDCommandError
from edgevisor.storage.nbd_server import Export, NBDServer
from edgevisor.storage.volume import Volume

MiB = 1 << 20
BS = 64 * 1024
SIZE = 3 * MiB + 5 * BS


@pytest.fixture
async def volume(tmp_path: Path) -> AsyncIterator[tuple[Volume, bytes]]:
    vol = Volume.create(tmp_path / "src", SIZE, BS)
    content = os.urandom(SIZE)
    await vol.write(0, content)
    try:
        yield vol, content
    finally:
        vol.close()


async def test_plain_reads_in_pipelined_pieces(volume: tuple[Volume, bytes]) -> None:
    vol, content = volume
    srv = NBDServer(workers=1, max_payload=256 * 1024)  # small: reads get split
    srv.add_export(Export("src", vol))
    _, port = await srv.start("127.0.0.1", 0)
    try:
        # The endpoint an async client remembers opens the blocking one.
        async with await NBDClient.connect("127.0.0.1", port, "src") as c:
            assert c.endpoint is not None
            r = await asyncio.to_thread(BlockingReader, c.endpoint)
        try:
            assert r.size_bytes == SIZE and r.max_payload == 256 * 1024
            buf = bytearray(b"\xaa" * (MiB + 100))
            await asyncio.to_thread(r.read_into, BS - 7, buf)  # five pieces, pipelined
            assert buf == content[BS - 7 : BS - 7 + MiB + 100]
            tail = bytearray(10)
            await asyncio.to_thread(r.read_into, SIZE - 10, memoryview(tail))
            assert tail == content[-10:]
            with pytest.raises(NBDCommandError):  # past the end: the server's error reply
                await asyncio.to_thread(r.read_into, SIZE - 10, bytearray(20))
            with pytest.raises(PeerUnavailable):  # the reader closed itself after that
                await asyncio.to_thread(r.read_into, 0, bytearray(10))
        finally:
            r.close()
    finally:
        await srv.aclose()


async def test_tls_reads_and_a_server_that_goes_away(
    tmp_path: Path, volume: tuple[Volume, bytes]
) -> None:
    vol, content = volume
    ca = FleetCA.load_or_create(tmp_path / "ca")
    ids = {}
    for host in ("source", "target"):
        ids[host] = HostIdentity(tmp_path / host, host)
        ids[host].store(ca.sign_host(host, ids[host].csr_pem()), ca.cert_pem)
    srv = NBDServer(ssl_context=ids["source"].server_context(), tls_required=True, workers=1)
    srv.add_export(Export("src", vol, allowed_peers=frozenset({"target"})))
    _, port = await srv.start("127.0.0.1", 0)
    ep = Endpoint("127.0.0.1", port, "src", ids["target"].client_context(), "source", None, 5.0)
    stopped = False
    try:
        r = await asyncio.to_thread(BlockingReader, ep)
        try:
            buf = bytearray(2 * MiB)
            await asyncio.to_thread(r.read_into, 3 * BS, buf)
            assert buf == content[3 * BS : 3 * BS + 2 * MiB]
            await srv.aclose()
            stopped = True
            with pytest.raises(PeerUnavailable):
                await asyncio.to_thread(r.read_into, 0, bytearray(BS))
        finally:
            r.close()
        with pytest.raises(PeerUnavailable):  # nobody listens any more
            await asyncio.to_thread(BlockingReader, ep)
        # A wrong peer is refused at the handshake, as a PeerUnavailable.
        srv = NBDServer(ssl_context=ids["source"].server_context(), tls_required=True)
        srv.add_export(Export("src", vol, allowed_peers=frozenset({"someone-else"})))
        await srv.start("127.0.0.1", port)
        stopped = False
        with pytest.raises(PeerUnavailable):
            await asyncio.to_thread(BlockingReader, ep)
    finally:
        if not stopped:
            await srv.aclose()

"""Our NBD client: pipelining against our server, interop with nbdkit, TLS peer checks."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from edgevisor.errors import PeerUnavailable
from edgevisor.proto.nbd_wire import CTX_BASE_ALLOCATION, CTX_EDGEVISOR_SYNC, STATE_HOLE
from edgevisor.storage.nbd_client import NBDClient, NBDCommandError
from edgevisor.storage.nbd_server import Export, NBDServer, NBDServerSettings
from edgevisor.storage.volume import Volume

MiB = 1 << 20
BS = 64 * 1024


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[tuple[NBDServer, int, Volume]]:
    vol = Volume.create(tmp_path / "v", 16 * MiB, BS, present=False)
    srv = NBDServer(max_payload=1 * MiB)
    srv.add_export(Export("v", vol))
    _, port = await srv.start()
    try:
        yield srv, port, vol
    finally:
        await srv.aclose()
        vol.close()


async def test_pipelined_reads_and_writes(server: tuple[NBDServer, int, Volume]) -> None:
    _, port, vol = server
    async with await NBDClient.connect("127.0.0.1", port, "v") as c:
        assert c.size_bytes == 16 * MiB and c.max_payload == MiB
        blobs = {i: os.urandom(BS) for i in range(64)}
        await asyncio.gather(*(c.write(i * BS, b) for i, b in blobs.items()))
        seen_in_flight = 0

        async def read(i: int) -> bytes:
            nonlocal seen_in_flight
            seen_in_flight = max(seen_in_flight, c.in_flight)
            return await c.read(i * BS, BS)

        got = await asyncio.gather(*(read(i) for i in range(64)))
        assert seen_in_flight > 1  # really pipelined
        assert all(got[i] == blobs[i] for i in range(64))
        # larger than max payload: split and reassembled
        big = os.urandom(3 * MiB + 123)
        await c.write(5 * MiB, big, fua=True)
        assert await c.read(5 * MiB, len(big)) == big
        await c.flush()
        sync = await c.block_status(0, 8 * MiB, CTX_EDGEVISOR_SYNC)
        assert sync[0] == (0, 4 * MiB, 0)  # blocks 0-63 present
        assert sync[1][2] == 1
        with pytest.raises(NBDCommandError) as ei:
            await c.read(16 * MiB - 10, 20)
        assert ei.value.errno == 22
        # the connection survives an error reply
        assert await c.read(0, 4) == blobs[0][:4]
    assert await vol.read(5 * MiB, 16) == big[:16]


async def test_list_exports_and_unknown_export(server: tuple[NBDServer, int, Volume]) -> None:
    _, port, _ = server
    assert await NBDClient.list_exports("127.0.0.1", port) == ["v"]
    with pytest.raises(PeerUnavailable):
        await NBDClient.connect("127.0.0.1", port, "nope")


async def test_server_going_away_fails_pending_commands(
    server: tuple[NBDServer, int, Volume],
) -> None:
    srv, port, _ = server
    c = await NBDClient.connect("127.0.0.1", port, "v")
    await srv.aclose()
    with pytest.raises(PeerUnavailable):
        for _ in range(100):
            await c.read(0, 4096)
            await asyncio.sleep(0.01)
    await c.aclose()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def nbdkit_memory() -> Iterator[int]:
    if not shutil.which("nbdkit"):
        pytest.skip("nbdkit not installed")
    port = _free_port()
    proc = subprocess.Popen(
        ["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), "memory", "8M"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None:
                    pytest.fail("nbdkit exited")
                import time

                time.sleep(0.05)
        yield port
    finally:
        proc.kill()
        proc.wait()


async def test_client_against_nbdkit(nbdkit_memory: int) -> None:
    async with await NBDClient.connect("127.0.0.1", nbdkit_memory, "") as c:
        assert c.size_bytes == 8 * MiB
        assert CTX_BASE_ALLOCATION in c.contexts
        data = os.urandom(200_000)
        await asyncio.gather(c.write(4096, data), c.write(4 * MiB, data))
        assert await c.read(4096, len(data)) == data
        await c.write_zeroes(4096, 100)
        assert await c.read(4096, 100) == bytes(100)
        await c.flush()
        ext = await c.block_status(6 * MiB, 1 * MiB)
        assert ext and ext[0][0] == 6 * MiB and ext[0][2] & STATE_HOLE


# --------------------------------------------------------------------- TLS


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not shutil.which("openssl"):
        pytest.skip("openssl CLI not installed")
    d = tmp_path_factory.mktemp("pki")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", f"{d}/ca.key", "-out", f"{d}/ca.pem",
             "-days", "2", "-subj", "/CN=edgevisor-test-ca")  # fmt: skip
    for cn in ("server", "peer-a", "peer-b"):
        _openssl("req", *ec, "-keyout", f"{d}/{cn}.key", "-out", f"{d}/{cn}.csr",
                 "-subj", f"/CN={cn}")  # fmt: skip
        ext = d / f"{cn}.ext"
        ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
        _openssl("x509", "-req", "-in", f"{d}/{cn}.csr", "-CA", f"{d}/ca.pem",
                 "-CAkey", f"{d}/ca.key", "-CAcreateserial", "-out", f"{d}/{cn}.pem",
                 "-days", "2", "-extfile", str(ext))  # fmt: skip
    return d


def _client_ctx(pki: Path, cn: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    ctx.load_cert_chain(str(pki / f"{cn}.pem"), str(pki / f"{cn}.key"))
    return ctx


async def test_tls_export_only_for_designated_peer(pki: Path, tmp_path: Path) -> None:
    settings = NBDServerSettings(
        tls_cert_file=str(pki / "server.pem"),
        tls_key_file=str(pki / "server.key"),
        tls_ca_file=str(pki / "ca.pem"),
    )
    vol = Volume.create(tmp_path / "s", 4 * MiB, BS)
    srv = NBDServer.from_settings(settings)
    srv.add_export(Export("secret", vol, allowed_peers=frozenset({"peer-a"})))
    srv.add_export(Export("open", vol))
    _, port = await srv.start()
    try:
        async with await NBDClient.connect(
            "127.0.0.1", port, "secret", ssl_context=_client_ctx(pki, "peer-a"),
            server_hostname="localhost",
        ) as c:  # fmt: skip
            await c.write(0, b"tls!", fua=True)
            assert await c.read(0, 4) == b"tls!"
        with pytest.raises(PeerUnavailable):
            await NBDClient.connect(
                "127.0.0.1", port, "secret", ssl_context=_client_ctx(pki, "peer-b"),
                server_hostname="localhost",
            )  # fmt: skip
        with pytest.raises(PeerUnavailable):  # plain text never sees it
            await NBDClient.connect("127.0.0.1", port, "secret")
        assert await NBDClient.list_exports("127.0.0.1", port) == ["open"]
        # a client certificate from outside the CA fails the TLS handshake
        bad = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        with pytest.raises(PeerUnavailable):
            c2 = await NBDClient.connect(
                "127.0.0.1", port, "open", ssl_context=bad, server_hostname="localhost"
            )
            await c2.read(0, 1)
        async with await NBDClient.connect("127.0.0.1", port, "open") as c3:
            assert await c3.read(0, 4) == b"tls!"
    finally:
        await srv.aclose()
        vol.close()


async def test_tls_interop_with_nbdinfo_and_plain_refusal(pki: Path, tmp_path: Path) -> None:
    if not shutil.which("nbdinfo") or not shutil.which("qemu-io"):
        pytest.skip("nbdinfo and qemu-io are required")
    certs = tmp_path / "certs"  # libnbd's (GnuTLS) layout for client certificates
    certs.mkdir()
    shutil.copy(pki / "ca.pem", certs / "ca-cert.pem")
    shutil.copy(pki / "peer-a.pem", certs / "client-cert.pem")
    shutil.copy(pki / "peer-a.key", certs / "client-key.pem")
    settings = NBDServerSettings(
        tls_cert_file=str(pki / "server.pem"),
        tls_key_file=str(pki / "server.key"),
        tls_ca_file=str(pki / "ca.pem"),
        tls_required=True,
    )
    vol = Volume.create(tmp_path / "t", 1 * MiB, BS)
    srv = NBDServer.from_settings(settings)
    srv.add_export(Export("secret", vol, allowed_peers=frozenset({"peer-a"})))
    _, port = await srv.start()
    try:
        uri = f"nbds://localhost:{port}/secret?tls-certificates={certs}"
        proc = await asyncio.create_subprocess_exec(
            "nbdinfo", "--size", uri, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0 and out.decode().strip() == str(MiB), out
        proc = await asyncio.create_subprocess_exec(
            "qemu-io", "-f", "raw", "-c", "read 0 512", f"nbd://127.0.0.1:{port}/secret",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode != 0 and b"TLS" in out, out
    finally:
        await srv.aclose()
        vol.close()

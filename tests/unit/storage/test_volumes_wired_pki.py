"""Fleet PKI (CA, host identities, TLS between hosts) and the volumes wire helpers."""

from __future__ import annotations

import asyncio
import os
import ssl
import stat
from pathlib import Path

import pytest

from edgevisor.agent.volume_parts import DeviceRef, volume_id
from edgevisor.errors import RequestError
from edgevisor.pki import FleetCA, HostIdentity, InvalidCSR, certificate_cn
from edgevisor.sdk.volumes import parse_size
from edgevisor.storage.volume import Volume


def _host(ca: FleetCA, d: Path, host: str) -> HostIdentity:
    ident = HostIdentity(d, host)
    ident.store(ca.sign_host(host, ident.csr_pem()), ca.cert_pem)
    return ident


def test_ca_is_created_once_with_a_private_key(tmp_path: Path) -> None:
    ca = FleetCA.load_or_create(tmp_path)
    assert stat.S_IMODE(os.stat(tmp_path / "ca.key").st_mode) == 0o600
    again = FleetCA.load_or_create(tmp_path)
    assert again.cert_pem == ca.cert_pem
    os.chmod(tmp_path / "ca.key", 0o644)  # widened by hand: repaired on load
    FleetCA.load_or_create(tmp_path)
    assert stat.S_IMODE(os.stat(tmp_path / "ca.key").st_mode) == 0o600


def test_the_ca_names_the_host_not_the_csr(tmp_path: Path) -> None:
    ca = FleetCA.load_or_create(tmp_path / "ca")
    liar = HostIdentity(tmp_path / "h", "someone-else")  # CSR asks for another CN
    cert = ca.sign_host("h1", liar.csr_pem())
    assert certificate_cn(cert) == "h1"
    with pytest.raises(InvalidCSR):  # and the liar cannot keep it under its own name
        liar.store(cert, ca.cert_pem)
    ident = HostIdentity(tmp_path / "h1", "h1")
    assert not ident.ready
    with pytest.raises(InvalidCSR):  # a certificate over someone else's key
        ident.store(cert, ca.cert_pem)
    ident.store(ca.sign_host("h1", ident.csr_pem()), ca.cert_pem)
    assert ident.ready and stat.S_IMODE(os.stat(ident.key_path).st_mode) == 0o600


@pytest.mark.parametrize("csr", ["", "junk", "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n"])
def test_bad_csr_is_refused(tmp_path: Path, csr: str) -> None:
    with pytest.raises(InvalidCSR):
        FleetCA.load_or_create(tmp_path).sign_host("h", csr)


async def _handshake(server: ssl.SSLContext, client: ssl.SSLContext, name: str) -> str | None:
    """TLS over loopback; returns the client's CN as the server saw it (None: refused)."""
    seen: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()

    async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        cert = w.get_extra_info("peercert") or {}
        cn = next((v for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"), None)
        if not seen.done():
            seen.set_result(cn)
        w.close()

    srv = await asyncio.start_server(on_conn, "127.0.0.1", 0, ssl=server)
    port = srv.sockets[0].getsockname()[1]
    try:
        try:
            _r, w = await asyncio.open_connection(
                "127.0.0.1", port, ssl=client, server_hostname=name
            )
            w.close()
        except (ssl.SSLError, ConnectionError):
            return None
        try:
            return await asyncio.wait_for(seen, 5)
        except TimeoutError:
            return None
    finally:
        srv.close()


async def test_hosts_authenticate_each_other(tmp_path: Path) -> None:
    ca = FleetCA.load_or_create(tmp_path / "ca")
    a, b = _host(ca, tmp_path / "a", "a"), _host(ca, tmp_path / "b", "b")
    assert await _handshake(a.server_context(), b.client_context(), "a") == "b"
    # the client checks the server's name: b is not a
    assert await _handshake(a.server_context(), b.client_context(), "b") is None
    rogue = _host(FleetCA.load_or_create(tmp_path / "rogue"), tmp_path / "r", "b")
    assert await _handshake(a.server_context(), rogue.client_context(), "a") is None


def test_parse_size() -> None:
    assert parse_size("1G") == 1 << 30
    assert parse_size("512m") == 512 << 20
    assert parse_size("10GiB") == 10 << 30
    assert parse_size("4096") == 4096
    assert parse_size(8192) == 8192
    for bad in ("", "G", "1.5G", "-1G", "1X", "lots"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_volume_id() -> None:
    assert volume_id("acme", "data") == "acme.data"
    for acct, name in (("a.b", "x"), ("acme", "x/y"), ("acme", ".."), ("", "x"), ("A", "x")):
        with pytest.raises(RequestError):
            volume_id(acct, name)


async def test_device_ref_forwards_and_can_be_repointed(tmp_path: Path) -> None:
    v1 = Volume.create(tmp_path / "v1", 1 << 20, 65536)
    v2 = Volume.create(tmp_path / "v2", 1 << 20, 65536)
    try:
        await v2.write(0, b"two")
        ref = DeviceRef(v1)
        await ref.write(0, b"one", fua=True)
        assert ref.file_extent(0, 4096) is not None  # the fast path survives the wrapper
        assert ref.write_nowait(8192, b"x") is True
        ref.target = v2
        assert await ref.read(0, 3) == b"two"
        assert await v1.read(0, 3) == b"one"

        class NoFastPaths:
            size_bytes = 1 << 20
            block_size = 65536

        ref.target = NoFastPaths()  # type: ignore[assignment]
        assert ref.file_extent(0, 4096) is None and ref.write_nowait(0, b"x") is False
    finally:
        v1.close()
        v2.close()

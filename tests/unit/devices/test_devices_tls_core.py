"""Client-certificate decisions (pure), the registry's certificate serials and revocation
list, whole-record export/restore, and the devices CA's certificates."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from edgevisor.devices.db import open_db
from edgevisor.devices.registry import DeviceRegistry
from edgevisor.devices.tls import DevicesTLS, check_peer, peer_identity, serial_hex
from edgevisor.errors import AlreadyExists, NotFound


def test_devices_peer_identity_reads_cn_and_serial() -> None:
    cert = {"subject": ((("commonName", "acme.s1"),),), "serialNumber": "0A1B"}
    assert peer_identity(cert) == ("acme.s1", "a1b")
    assert peer_identity(None) is None
    assert peer_identity({}) is None
    assert peer_identity({"subject": ((("commonName", "x"),),)}) is None  # no serial
    assert peer_identity({"subject": (), "serialNumber": "01"}) is None  # no CN
    assert peer_identity({"subject": ((("commonName", "x"),),), "serialNumber": "zz"}) is None


@pytest.mark.parametrize(
    ("ident", "current", "revoked", "username", "ok", "reason"),
    [
        (("d1", "a"), "a", False, None, True, "ok"),
        (("d1", "a"), "a", False, "d1", True, "ok"),
        (("d1", "a"), "a", False, "d2", False, "differs"),
        (("d1", "a"), "b", False, None, False, "replaced"),
        (("d1", "a"), None, False, None, False, "no registered device"),
        (("d1", "a"), "a", True, None, False, "revoked"),
        (None, "a", False, None, False, "no verified"),
    ],
)
def test_devices_check_peer(
    ident: tuple[str, str] | None,
    current: str | None,
    revoked: bool,
    username: str | None,
    ok: bool,
    reason: str,
) -> None:
    verdict = check_peer(ident, current_serial=current, revoked=revoked, username=username)
    assert verdict.ok is ok
    assert reason in verdict.reason


def test_devices_registry_serials_and_revocation(tmp_path: Path) -> None:
    reg = DeviceRegistry(open_db(tmp_path / "d.db"))
    reg.add("d1", "pw")
    assert reg.cert_serial("d1") is None
    reg.set_cert_serial("d1", "aa")
    assert reg.cert_serial("d1") == "aa" and not reg.is_revoked("aa")
    reg.set_cert_serial("d1", "bb")  # replaced: the old one is revoked
    assert reg.is_revoked("aa") and not reg.is_revoked("bb")
    with pytest.raises(NotFound):
        reg.set_cert_serial("ghost", "cc")
    rec = reg.export("d1")
    reg.remove("d1")
    assert reg.is_revoked("bb")
    assert [r[:2] for r in reg.revoked()] == [("aa", "d1"), ("bb", "d1")]
    reg.restore(rec)  # a rollback: same hash, same certificate, taken off the list
    assert reg.verify("d1", "pw") and reg.cert_serial("d1") == "bb"
    assert not reg.is_revoked("bb") and reg.is_revoked("aa")
    with pytest.raises(AlreadyExists):
        reg.restore(rec)


def test_devices_registry_adds_serial_column_to_old_db(tmp_path: Path) -> None:
    conn = open_db(tmp_path / "old.db")
    conn.execute(
        "CREATE TABLE devices (name TEXT PRIMARY KEY, password_hash TEXT NOT NULL,"
        " created_at REAL NOT NULL)"
    )
    conn.execute("INSERT INTO devices VALUES ('d1', 'x', 1.0)")
    reg = DeviceRegistry(conn)
    assert reg.cert_serial("d1") is None
    reg.set_cert_serial("d1", "ab")
    assert reg.cert_serial("d1") == "ab"


def test_devices_ca_issues_client_and_server_certificates(tmp_path: Path) -> None:
    tls = DevicesTLS.load_or_create(tmp_path / "tls", names=("edge1",), ips=("0.0.0.0",))
    assert (tmp_path / "tls" / "ca.key").stat().st_mode & 0o777 == 0o600
    assert tls.key_path.stat().st_mode & 0o777 == 0o600
    cert = tls.issue_device("acme.s1")
    from cryptography import x509

    parsed = x509.load_pem_x509_certificate(cert.cert_pem.encode())
    assert parsed.subject.rfc4514_string() == "CN=acme.s1"
    assert serial_hex(parsed.serial_number) == cert.serial
    assert cert.ca_pem == tls.ca_path.read_text()
    server = x509.load_pem_x509_certificate(tls.cert_path.read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "edge1"} <= set(san.get_values_for_type(x509.DNSName))
    assert [str(i) for i in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    ctx = tls.server_context()
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    # Same names: the server certificate is kept; other names: reissued.
    before = tls.cert_path.read_bytes()
    assert DevicesTLS.load_or_create(tmp_path / "tls", names=("edge1",)).cert_path.read_bytes() \
        == before  # fmt: skip
    DevicesTLS.load_or_create(tmp_path / "tls", names=("edge2",))
    assert tls.cert_path.read_bytes() != before
    # The CA is kept across restarts: a device certificate stays valid.
    again = DevicesTLS.load_or_create(tmp_path / "tls", names=("edge2",))
    assert again.ca.cert_pem == tls.ca.cert_pem

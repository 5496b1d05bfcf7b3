"""Fleet PKI for links between hosts: a controller-held CA and one certificate per host.

The controller keeps a fleet CA (created on its first start) whose key never leaves the
controller's data dir (mode 0600). An agent makes its own key (mode 0600, never sent),
sends a certificate signing request at join (or later, through a host-authenticated
endpoint) and stores the host certificate (CN = host name, SAN = host name) and the CA
certificate next to the key. Both ends of a link between hosts (NBD over TLS) present
their host certificate and check the other's against the fleet CA; the NBD server then
lets only the designated peer (by CN) open an export.

The controller decides the CN from the authenticated host, never from the request: a CSR
only proves possession of the key.
"""

from __future__ import annotations

import datetime as dt
import os
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgevisor.errors import RequestError

__all__ = ["FleetCA", "HostIdentity", "InvalidCSR", "certificate_cn"]

_CERT_DAYS = 825
_CA_DAYS = 3650


class InvalidCSR(RequestError):
    code = "invalid_csr"


def _write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write atomically with ``mode`` from the first byte (no window with wider rights)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path}: not an EC private key")
    return key


def certificate_cn(cert_pem: str | bytes) -> str:
    """The subject CN of a PEM certificate."""
    data = cert_pem.encode() if isinstance(cert_pem, str) else cert_pem
    cert = x509.load_pem_x509_certificate(data)
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else ""


class FleetCA:
    """The controller's CA: ``<dir>/ca.key`` (0600) and ``<dir>/ca.crt``."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        self._key = key
        self.cert = cert

    @property
    def cert_pem(self) -> str:
        return self.cert.public_bytes(serialization.Encoding.PEM).decode()

    @classmethod
    def load_or_create(cls, directory: Path, *, name: str = "edgevisor fleet CA") -> FleetCA:
        key_path, cert_path = directory / "ca.key", directory / "ca.crt"
        if key_path.exists() and cert_path.exists():
            os.chmod(key_path, 0o600)  # repair rights widened by hand
            return cls(_load_key(key_path), x509.load_pem_x509_certificate(cert_path.read_bytes()))
        key = _new_key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=_CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        _write_private(key_path, _key_pem(key))
        _write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        return cls(key, cert)

    def sign_host(self, host: str, csr_pem: str) -> str:
        """A host certificate for ``host`` over the CSR's key (CN and SAN = ``host``)."""
        try:
            csr = x509.load_pem_x509_csr(csr_pem.encode())
        except ValueError as exc:
            raise InvalidCSR(f"not a PEM certificate signing request: {exc}") from exc
        if not csr.is_signature_valid:
            raise InvalidCSR("the CSR's signature does not match its key")
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
            .issuer_name(self.cert.subject)
            .public_key(csr.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=_CERT_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM).decode()


class HostIdentity:
    """One host's key, certificate and the fleet CA, under ``<dir>`` (the agent's pki dir)."""

    def __init__(self, directory: Path, host: str) -> None:
        self.dir = directory
        self.host = host
        self.key_path = directory / "host.key"
        self.cert_path = directory / "host.crt"
        self.ca_path = directory / "ca.crt"

    def _key(self) -> ec.EllipticCurvePrivateKey:
        if not self.key_path.exists():
            _write_private(self.key_path, _key_pem(_new_key()))
        return _load_key(self.key_path)

    def csr_pem(self) -> str:
        """A CSR over this host's key (made on first use; the key stays here)."""
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.host)]))
            .sign(self._key(), hashes.SHA256())
        )
        return csr.public_bytes(serialization.Encoding.PEM).decode()

    @property
    def ready(self) -> bool:
        return self.cert_path.exists() and self.ca_path.exists() and self.key_path.exists()

    def store(self, cert_pem: str, ca_pem: str) -> None:
        """Keep the issued certificate, after checking it is ours (CN, key)."""
        cert = x509.load_pem_x509_certificate(cert_pem.encode())
        if certificate_cn(cert_pem) != self.host:
            raise InvalidCSR(f"issued certificate names {certificate_cn(cert_pem)!r}")
        if cert.public_key() != self._key().public_key():
            raise InvalidCSR("issued certificate is not for this host's key")
        x509.load_pem_x509_certificate(ca_pem.encode())  # parses, or raises
        _write_private(self.ca_path, ca_pem.encode(), 0o644)
        _write_private(self.cert_path, cert_pem.encode(), 0o644)

    def server_context(self) -> ssl.SSLContext:
        """TLS server side: present the host cert, require a fleet client cert."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.cert_path, self.key_path)
        ctx.load_verify_locations(self.ca_path)
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """TLS client side: present the host cert; the server must be a fleet host whose
        name the caller passes as ``server_hostname``."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.cert_path, self.key_path)
        ctx.load_verify_locations(self.ca_path)
        ctx.check_hostname = True
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

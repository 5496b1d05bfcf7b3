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
import json
import os
import ssl
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgevisor.errors import RequestError

# cryptography (~10 MiB resident with its Rust extension) is imported where it is used: an
# agent needs it only for the CSR at join, and a joined agent's TLS goes through ``ssl``.
if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

__all__ = ["FleetCA", "HostIdentity", "InvalidCSR", "certificate_cn", "load_csr"]

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
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path}: not an EC private key")
    return key


def certificate_cn(cert_pem: str | bytes) -> str:
    """The subject CN of a PEM certificate."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

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
        from cryptography.hazmat.primitives import serialization

        return self.cert.public_bytes(serialization.Encoding.PEM).decode()

    @classmethod
    def load_or_create(cls, directory: Path, *, name: str = "edgevisor fleet CA") -> FleetCA:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.x509.oid import NameOID

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
        cert_pem, _ = self._leaf(host, load_csr(csr_pem).public_key(), dns=(host,), server=True)
        return cert_pem

    def sign_client(self, cn: str, csr_pem: str) -> tuple[str, int]:
        """A client certificate for ``cn`` over the CSR's key: (certificate PEM, serial).

        For a party that keeps its key (a device that made its own CSR). The CN is the
        caller's decision, whatever the CSR's subject says: the CSR only proves possession
        of the key.
        """
        return self._leaf(cn, load_csr(csr_pem).public_key())

    def issue_key_and_cert(
        self,
        cn: str,
        *,
        dns: tuple[str, ...] = (),
        ips: tuple[str, ...] = (),
        server: bool = False,
        days: int = _CERT_DAYS,
    ) -> tuple[str, str, int]:
        """A new key and a certificate for it: (key PEM, certificate PEM, serial).

        For parties that cannot make their own CSR (a device handed its credentials once):
        the key is made here and returned, never kept. ``server`` adds SERVER_AUTH to the
        extended key usage (CLIENT_AUTH is always there); ``dns``/``ips`` become SANs.
        """
        key = _new_key()
        cert_pem, serial = self._leaf(
            cn, key.public_key(), dns=dns, ips=ips, server=server, days=days
        )
        return _key_pem(key).decode(), cert_pem, serial

    def _leaf(
        self,
        cn: str,
        public_key: CertificatePublicKeyTypes,
        *,
        dns: tuple[str, ...] = (),
        ips: tuple[str, ...] = (),
        server: bool = False,
        days: int = _CERT_DAYS,
    ) -> tuple[str, int]:
        """A certificate for ``public_key`` signed by this CA: (PEM, serial)."""
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        now = dt.datetime.now(dt.UTC)
        serial = x509.random_serial_number()
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
        if server:
            usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(serial)
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        )
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM).decode(), serial


def load_csr(csr_pem: str) -> x509.CertificateSigningRequest:
    """A parsed CSR whose signature matches its key (proof of possession)."""
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode())
    except ValueError as exc:
        raise InvalidCSR(f"not a PEM certificate signing request: {exc}") from exc
    try:
        valid = csr.is_signature_valid
        key = csr.public_key()
    except (ValueError, TypeError) as exc:  # an unsupported or broken key
        raise InvalidCSR(f"the CSR's key cannot be used: {exc}") from exc
    if not valid:
        raise InvalidCSR("the CSR's signature does not match its key")
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < 2048:
        raise InvalidCSR(f"an RSA key of {key.key_size} bits is too small (2048 at least)")
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey):
        raise InvalidCSR(f"unsupported key type {type(key).__name__} (use EC, RSA or Ed25519)")
    return csr


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
        return _in_child("csr", self)

    def _csr_pem_here(self) -> str:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.x509.oid import NameOID

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
        """Keep the issued certificate, after checking it is ours (CN, key).

        Checked with the ``ssl`` module (OpenSSL is loaded anyway), not cryptography: the
        certificate must parse and name this host, and OpenSSL must accept it together with
        this host's key; the CA certificate must parse.
        """
        self.dir.mkdir(parents=True, exist_ok=True)
        cert_tmp = self.dir / "host.crt.check"
        ca_tmp = self.dir / "ca.crt.check"
        try:
            cert_tmp.write_text(cert_pem)
            ca_tmp.write_text(ca_pem)
            cn = _file_cn(cert_tmp)
            if cn != self.host:
                raise InvalidCSR(f"issued certificate names {cn!r}")
            try:
                ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(cert_tmp, self.key_path)
            except (ssl.SSLError, FileNotFoundError):  # another key, or none yet
                raise InvalidCSR("issued certificate is not for this host's key") from None
            _file_cn(ca_tmp)  # parses, or raises
        finally:
            cert_tmp.unlink(missing_ok=True)
            ca_tmp.unlink(missing_ok=True)
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


# --- the agent's certificate work, in a child interpreter -----------------------------------
#
# An agent needs cryptography only to make its key and CSR at join (the certificate it gets
# back is checked with ``ssl``). Importing it maps ~10 MiB (its Rust extension) that stay
# resident for the agent's whole life, more than any other single part of an idle agent,
# so that one step runs in a short-lived child (once per host, ~0.1-0.4 s, before the join
# request). The controller's CA work stays in-process.


def _file_cn(path: Path) -> str:
    """The subject CN of the PEM certificate in ``path``; ValueError if it does not parse."""
    decode: Any = getattr(ssl, "_ssl")._test_decode_cert  # noqa: B009 (CPython's own parser)
    try:
        info = decode(str(path))
    except (ssl.SSLError, UnicodeError) as exc:
        raise ValueError(f"not a PEM certificate: {exc}") from exc
    for rdn in info.get("subject", ()):
        for name, value in rdn:
            if name == "commonName":
                return str(value)
    return ""


def _in_child(op: str, ident: HostIdentity, *args: str) -> str:
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1])  # the directory holding ``edgevisor``
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    request = json.dumps({"op": op, "dir": str(ident.dir), "host": ident.host, "args": args})
    proc = subprocess.run(
        [sys.executable, "-m", "edgevisor.pki"],
        input=request, capture_output=True, text=True, env=env, check=False, timeout=120,
    )  # fmt: skip
    try:
        reply = json.loads(proc.stdout)
    except ValueError:
        tail = proc.stderr[-2000:]
        raise RuntimeError(f"pki helper failed ({proc.returncode}): {tail}") from None
    if "error" in reply:
        kind, msg = reply["kind"], reply["error"]
        if kind == "invalid_csr":
            raise InvalidCSR(msg)
        raise OSError(msg) if kind == "os" else ValueError(msg)
    return str(reply["ok"])


def _child_main() -> int:
    """``python -m edgevisor.pki``: one HostIdentity step, request and reply as JSON."""
    req = json.loads(sys.stdin.read())
    ident = HostIdentity(Path(req["dir"]), req["host"])
    try:
        out = ident._csr_pem_here()
    except InvalidCSR as exc:
        reply: dict[str, str] = {"error": exc.message, "kind": "invalid_csr"}
    except ValueError as exc:
        reply = {"error": str(exc), "kind": "value"}
    except OSError as exc:
        reply = {"error": str(exc), "kind": "os"}
    else:
        reply = {"ok": out}
    sys.stdout.write(json.dumps(reply))
    return 0


if __name__ == "__main__":
    sys.exit(_child_main())

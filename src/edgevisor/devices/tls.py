"""TLS for the embedded broker: a devices CA per agent, device client certificates, and
the peer-certificate check.

Who signs. Each agent keeps its own *devices CA* (``<tls_dir>/ca.key`` 0600, ``ca.crt``),
separate from the fleet CA that signs host certificates: a device certificate must never be
usable as a host identity on links between hosts (and the reverse), and the agent is the
authority for its devices anyway — it registers them, also while the controller is
unreachable, and it is the one that checks them. The broker's server certificate
(``broker.crt``/``broker.key``) is signed by the same CA with SANs ``localhost``, the host
name, ``127.0.0.1`` and the listen address, so the one ``ca.crt`` a device is given both
verifies the broker and is what the broker verifies the device against.

A device certificate: CN = the device's (qualified) name, EKU client auth, made on
``add`` and returned once (key, certificate, CA certificate); the agent keeps only its
serial. The broker accepts a TLS client only if (:func:`check_peer`) the chain verifies
against the devices CA (OpenSSL, in the handshake), its CN is a registered device, its
serial is that device's current serial, and the serial is not on the revocation list
(serials of removed devices and replaced certificates). The CN becomes the MQTT username,
so ACLs apply as for a password login.

cryptography is imported only here and only when TLS is on (see :mod:`edgevisor.pki`).
"""

from __future__ import annotations

import ipaddress
import json
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgevisor.pki import FleetCA, _write_private

__all__ = ["DeviceCertificate", "DevicesTLS", "PeerCheck", "check_peer", "peer_identity"]

_BROKER_CN = "edgevisor broker"


@dataclass(frozen=True, slots=True)
class DeviceCertificate:
    """What a device is given once: its key (none when it sent its own CSR), its
    certificate and the CA bundle (PEM)."""

    device: str
    key_pem: str | None
    cert_pem: str
    ca_pem: str
    serial: str

    def to_json(self) -> dict[str, str | None]:
        return {
            "key_pem": self.key_pem,
            "cert_pem": self.cert_pem,
            "ca_pem": self.ca_pem,
            "serial": self.serial,
        }


def serial_hex(serial: int) -> str:
    """The one spelling of a serial used in the registry and the revocation list."""
    return format(serial, "x")


def peer_identity(peercert: dict[str, Any] | None) -> tuple[str, str] | None:
    """(CN, serial) of a verified peer certificate as ``SSLObject.getpeercert()`` gives it."""
    if not peercert:
        return None
    cn = ""
    for rdn in peercert.get("subject", ()):
        for name, value in rdn:
            if name == "commonName":
                cn = str(value)
    raw = peercert.get("serialNumber")
    if not cn or not raw:
        return None
    try:
        return cn, serial_hex(int(str(raw), 16))
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class PeerCheck:
    ok: bool
    device: str | None
    reason: str


def check_peer(
    identity: tuple[str, str] | None,
    *,
    current_serial: str | None,
    revoked: bool,
    username: str | None,
) -> PeerCheck:
    """Decide a TLS login (pure). ``current_serial`` is the registered device's serial
    (None: no such device, or no certificate issued to it); ``username``, if the client
    sent one, must be the certificate's CN."""
    if identity is None:
        return PeerCheck(False, None, "no verified client certificate")
    cn, serial = identity
    if revoked:
        return PeerCheck(False, cn, "certificate revoked")
    if current_serial is None:
        return PeerCheck(False, cn, "no registered device holds this certificate")
    if serial != current_serial:
        return PeerCheck(False, cn, "certificate replaced by a newer one")
    if username and username != cn:
        return PeerCheck(False, cn, f"username {username!r} differs from the certificate")
    return PeerCheck(True, cn, "ok")


class DevicesTLS:
    """The devices CA and the broker's server certificate under one directory."""

    def __init__(self, directory: Path, ca: FleetCA) -> None:
        self.dir = directory
        self.ca = ca
        self.ca_path = directory / "ca.crt"
        self.cert_path = directory / "broker.crt"
        self.key_path = directory / "broker.key"

    @classmethod
    def load_or_create(
        cls, directory: Path, *, names: tuple[str, ...] = (), ips: tuple[str, ...] = ()
    ) -> DevicesTLS:
        """Load (or make) the CA; (re)issue the broker certificate when its names changed."""
        ca = FleetCA.load_or_create(directory, name="edgevisor devices CA")
        tls = cls(directory, ca)
        tls._ensure_server_cert(names, ips)
        return tls

    def _ensure_server_cert(self, names: tuple[str, ...], ips: tuple[str, ...]) -> None:
        dns = sorted({"localhost", *names})
        addrs = {"127.0.0.1"}
        for ip in ips:
            try:
                if not ipaddress.ip_address(ip).is_unspecified:
                    addrs.add(ip)
            except ValueError:
                dns = sorted({*dns, ip})  # a name to listen on
        want = {"dns": dns, "ips": sorted(addrs)}
        meta = self.dir / "broker.json"
        try:
            have = json.loads(meta.read_text())
        except (FileNotFoundError, ValueError):
            have = None
        if have == want and self.cert_path.exists() and self.key_path.exists():
            return
        key_pem, cert_pem, _ = self.ca.issue_key_and_cert(
            _BROKER_CN, dns=tuple(want["dns"]), ips=tuple(want["ips"]), server=True
        )
        _write_private(self.key_path, key_pem.encode())
        _write_private(self.cert_path, cert_pem.encode(), 0o644)
        _write_private(meta, json.dumps(want).encode(), 0o644)

    def issue_device(self, device: str, csr_pem: str | None = None) -> DeviceCertificate:
        """A certificate for ``device``: over the key of its CSR (the key never leaves the
        device), or over a key made here and handed over once."""
        key_pem: str | None = None
        if csr_pem is None:
            key_pem, cert_pem, serial = self.ca.issue_key_and_cert(device)
        else:
            cert_pem, serial = self.ca.sign_client(device, csr_pem)
        return DeviceCertificate(device, key_pem, cert_pem, self.ca.cert_pem, serial_hex(serial))

    def server_context(self) -> ssl.SSLContext:
        """Present the broker certificate; require a client certificate of the devices CA."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.cert_path, self.key_path)
        ctx.load_verify_locations(self.ca_path)
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

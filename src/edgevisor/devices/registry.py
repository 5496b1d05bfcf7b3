"""Registered devices: credentials (hash only) and topic ACLs, persisted in the device DB.

Credentials. The MQTT username is the device name; the password is stored only as an
scrypt hash (``scrypt$N$r$p$salt$hash``, base64 parts; stdlib :func:`hashlib.scrypt`,
N=2**14, r=8, p=1: ~16 MiB and tens of ms per check, paid once per connection).

Client certificates (TLS listener): the registry keeps the serial of each device's current
certificate (``cert_serial``) and a revocation list (``revoked_certs``) of the serials of
removed devices and replaced certificates; the broker refuses both.

ACL of device ``<n>`` (topic scheme in :mod:`edgevisor.devices.topics`):

=========  =============================================================================
publish    ``devices/<n>/#``, ``edgevisor/shadow/<n>/update``, ``edgevisor/shadow/<n>/get``
subscribe  ``devices/<n>/#``, ``edgevisor/shadow/<n>/#``
=========  =============================================================================

plus what routes grant (:func:`edgevisor.devices.routes.grants`): publish on the filter of a
route that names the device as its source, subscribe to that route's reply topic. A
subscription is allowed only if an allowed filter *covers* it (``devices/<n>/+/x`` yes,
``devices/+/x`` no). With an external broker these ACLs are not enforced by edgevisor: the
broker's own ACL file must say the same (``acl_lines`` renders it in mosquitto's format).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import sqlite3
import time
from collections.abc import Mapping
from dataclasses import dataclass

from edgevisor.devices.topics import device_root, filter_covers, matches, shadow_topic
from edgevisor.errors import AlreadyExists, NotFound, RequestError

__all__ = [
    "Acl",
    "Device",
    "DeviceRecord",
    "DeviceRegistry",
    "hash_password",
    "own_acl",
    "valid_device_name",
    "verify_password",
]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1


def valid_device_name(name: str) -> str:
    if not _NAME.match(name):
        raise RequestError(
            f"device name {name!r}: use 1-63 letters, digits, '_', '.', '-', "
            "starting with a letter or digit"
        )
    return name


def new_password() -> str:
    """A generated device password (144 bits) that never starts with "-".

    Operators pass it to CLI clients (mosquitto_pub -P, argparse tools) where a
    leading dash reads as an option.
    """
    while True:
        password = secrets.token_urlsafe(18)
        if not password.startswith("-"):
            return password


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(
        password.encode(), salt=salt, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P, dklen=32
    )
    b64 = base64.b64encode
    return f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, stored: str) -> bool:
    """Constant-time check of ``password`` against a :func:`hash_password` string."""
    try:
        scheme, n, r, p, salt_b64, digest_b64 = stored.split("$")
        if scheme != "scrypt":
            return False
        salt = base64.b64decode(salt_b64)
        want = base64.b64decode(digest_b64)
        got = hashlib.scrypt(
            password.encode(), salt=salt, n=int(n), r=int(r), p=int(p), dklen=len(want)
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, want)


@dataclass(frozen=True, slots=True)
class Acl:
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]

    def may_publish(self, topic: str) -> bool:
        return any(matches(f, topic) for f in self.publish)

    def may_subscribe(self, topic_filter: str) -> bool:
        return any(filter_covers(f, topic_filter) for f in self.subscribe)


def own_acl(name: str) -> Acl:
    return Acl(
        publish=(device_root(name), shadow_topic(name, "update"), shadow_topic(name, "get")),
        subscribe=(device_root(name), shadow_topic(name, "#")),
    )


@dataclass(frozen=True, slots=True)
class Device:
    name: str
    created_at: float


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    """Everything the registry holds about a device, to put it back exactly (rollback)."""

    name: str
    password_hash: str
    created_at: float
    cert_serial: str | None


class DeviceRegistry:
    """Devices and their credential hashes; ACLs are computed, grants come from routes."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        conn.execute(
            "CREATE TABLE IF NOT EXISTS devices ("
            " name TEXT PRIMARY KEY, password_hash TEXT NOT NULL, created_at REAL NOT NULL)"
        )
        cols = {r[1] for r in conn.execute("PRAGMA table_info(devices)")}
        if "cert_serial" not in cols:  # databases made before client certificates
            conn.execute("ALTER TABLE devices ADD COLUMN cert_serial TEXT")
        # Serials that must never log in again: removed devices', replaced certificates'.
        conn.execute(
            "CREATE TABLE IF NOT EXISTS revoked_certs ("
            " serial TEXT PRIMARY KEY, device TEXT NOT NULL, revoked_at REAL NOT NULL)"
        )
        self._grants: dict[str, tuple[list[str], list[str]]] = {}
        self._acl_cache: dict[str, Acl] = {}

    def add(self, name: str, password: str | None = None) -> str:
        """Register a device; returns its password (generated when not given)."""
        valid_device_name(name)
        if password is None:
            password = new_password()
        elif not password:
            raise RequestError("password must not be empty")
        try:
            self._conn.execute(
                "INSERT INTO devices (name, password_hash, created_at) VALUES (?, ?, ?)",
                (name, hash_password(password), time.time()),
            )
        except sqlite3.IntegrityError as exc:
            raise AlreadyExists(f"device {name!r} already exists") from exc
        return password

    def set_password(self, name: str, password: str) -> None:
        cur = self._conn.execute(
            "UPDATE devices SET password_hash = ? WHERE name = ?", (hash_password(password), name)
        )
        if cur.rowcount == 0:
            raise NotFound(f"no device named {name!r}")

    def remove(self, name: str) -> None:
        serial = self.cert_serial(name)
        cur = self._conn.execute("DELETE FROM devices WHERE name = ?", (name,))
        if cur.rowcount == 0:
            raise NotFound(f"no device named {name!r}")
        if serial is not None:
            self._revoke(name, serial)
        self._acl_cache.pop(name, None)

    # --- client certificates -------------------------------------------------------------

    def set_cert_serial(self, name: str, serial: str) -> None:
        """Record the device's (new) certificate; a replaced one is revoked."""
        old = self.cert_serial(name)
        cur = self._conn.execute(
            "UPDATE devices SET cert_serial = ? WHERE name = ?", (serial, name)
        )
        if cur.rowcount == 0:
            raise NotFound(f"no device named {name!r}")
        if old is not None and old != serial:
            self._revoke(name, old)

    def cert_serial(self, name: str) -> str | None:
        row = self._conn.execute(
            "SELECT cert_serial FROM devices WHERE name = ?", (name,)
        ).fetchone()
        return None if row is None or row[0] is None else str(row[0])

    def is_revoked(self, serial: str) -> bool:
        return (
            self._conn.execute("SELECT 1 FROM revoked_certs WHERE serial = ?", (serial,)).fetchone()
            is not None
        )

    def revoked(self) -> list[tuple[str, str, float]]:
        """The revocation list: (serial, device, revoked_at), oldest first."""
        rows = self._conn.execute(
            "SELECT serial, device, revoked_at FROM revoked_certs ORDER BY revoked_at, serial"
        )
        return [(str(r[0]), str(r[1]), float(r[2])) for r in rows]

    def _revoke(self, name: str, serial: str) -> None:
        self._conn.execute(
            "INSERT OR IGNORE INTO revoked_certs (serial, device, revoked_at) VALUES (?, ?, ?)",
            (serial, name, time.time()),
        )

    # --- whole records (deployment rollback) ---------------------------------------------

    def export(self, name: str) -> DeviceRecord:
        row = self._conn.execute(
            "SELECT name, password_hash, created_at, cert_serial FROM devices WHERE name = ?",
            (name,),
        ).fetchone()
        if row is None:
            raise NotFound(f"no device named {name!r}")
        return DeviceRecord(row[0], row[1], row[2], row[3])

    def restore(self, rec: DeviceRecord) -> None:
        """Put a removed device back as it was: same credentials, same certificate."""
        try:
            self._conn.execute(
                "INSERT INTO devices (name, password_hash, created_at, cert_serial)"
                " VALUES (?, ?, ?, ?)",
                (rec.name, rec.password_hash, rec.created_at, rec.cert_serial),
            )
        except sqlite3.IntegrityError as exc:
            raise AlreadyExists(f"device {rec.name!r} already exists") from exc
        if rec.cert_serial is not None:
            self._conn.execute("DELETE FROM revoked_certs WHERE serial = ?", (rec.cert_serial,))
        self._acl_cache.pop(rec.name, None)

    def get(self, name: str) -> Device:
        row = self._conn.execute(
            "SELECT name, created_at FROM devices WHERE name = ?", (name,)
        ).fetchone()
        if row is None:
            raise NotFound(f"no device named {name!r}")
        return Device(row[0], row[1])

    def exists(self, name: str) -> bool:
        return (
            self._conn.execute("SELECT 1 FROM devices WHERE name = ?", (name,)).fetchone()
            is not None
        )

    def devices(self) -> list[Device]:
        rows = self._conn.execute("SELECT name, created_at FROM devices ORDER BY name")
        return [Device(r[0], r[1]) for r in rows]

    def password_hash(self, name: str) -> str | None:
        """The stored hash, or None for an unknown device (the broker checks it off-loop)."""
        row = self._conn.execute(
            "SELECT password_hash FROM devices WHERE name = ?", (name,)
        ).fetchone()
        return None if row is None else str(row[0])

    def verify(self, name: str, password: str) -> bool:
        stored = self.password_hash(name)
        return stored is not None and verify_password(password, stored)

    def set_grants(self, grants: Mapping[str, tuple[list[str], list[str]]]) -> None:
        """Replace the route-derived grants: device -> (publish filters, subscribe filters)."""
        self._grants = {k: (list(v[0]), list(v[1])) for k, v in grants.items()}
        self._acl_cache.clear()

    def acl(self, name: str) -> Acl:
        acl = self._acl_cache.get(name)
        if acl is None:
            own = own_acl(name)
            pub, sub = self._grants.get(name, ([], []))
            acl = Acl(own.publish + tuple(pub), own.subscribe + tuple(sub))
            self._acl_cache[name] = acl
        return acl

    def acl_lines(self) -> list[str]:
        """The ACLs in mosquitto ``acl_file`` syntax, for use with an external broker."""
        lines: list[str] = []
        for dev in self.devices():
            acl = self.acl(dev.name)
            lines.append(f"user {dev.name}")
            lines += [f"topic write {f}" for f in acl.publish]
            lines += [f"topic read {f}" for f in acl.subscribe]
            lines.append("")
        return lines

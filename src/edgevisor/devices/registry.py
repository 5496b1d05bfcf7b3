"""Registered devices: credentials (hash only) and topic ACLs, persisted in the device DB.

Credentials. The MQTT username is the device name; the password is stored only as an
scrypt hash (``scrypt$N$r$p$salt$hash``, base64 parts; stdlib :func:`hashlib.scrypt`,
N=2**14, r=8, p=1: ~16 MiB and tens of ms per check, paid once per connection).

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


class DeviceRegistry:
    """Devices and their credential hashes; ACLs are computed, grants come from routes."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        conn.execute(
            "CREATE TABLE IF NOT EXISTS devices ("
            " name TEXT PRIMARY KEY, password_hash TEXT NOT NULL, created_at REAL NOT NULL)"
        )
        self._grants: dict[str, tuple[list[str], list[str]]] = {}
        self._acl_cache: dict[str, Acl] = {}

    def add(self, name: str, password: str | None = None) -> str:
        """Register a device; returns its password (generated when not given)."""
        valid_device_name(name)
        if password is None:
            password = secrets.token_urlsafe(18)
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
        cur = self._conn.execute("DELETE FROM devices WHERE name = ?", (name,))
        if cur.rowcount == 0:
            raise NotFound(f"no device named {name!r}")
        self._acl_cache.pop(name, None)

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

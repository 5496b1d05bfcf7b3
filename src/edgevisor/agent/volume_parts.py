"""The parts of the volumes capability that hold no logic of their own: volume ids, the
re-pointable device every served volume is, the per-volume entry with its ``meta.json``,
and payload helpers (:mod:`edgevisor.agent.volumes` has the capability itself)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from edgevisor.errors import RequestError
from edgevisor.storage.attach import AttachedVolume
from edgevisor.storage.blockdev import BlockDevice
from edgevisor.storage.lazy import LazyVolume
from edgevisor.storage.volume import Volume

__all__ = [
    "DeviceRef",
    "VolumeEntry",
    "check_source",
    "int_field",
    "opt_str",
    "socket_path",
    "volume_id",
]

_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


def volume_id(account: str, name: str) -> str:
    for what, v in (("account", account), ("volume name", name)):
        if not _NAME.match(v):
            raise RequestError(f"bad {what} {v!r}: lowercase letters, digits, '-' and '_'")
    return f"{account}.{name}"


class DeviceRef:
    """A :class:`BlockDevice` that forwards to a device the agent may swap under it."""

    def __init__(self, target: BlockDevice) -> None:
        self.target = target

    @property
    def size_bytes(self) -> int:
        return self.target.size_bytes

    @property
    def block_size(self) -> int:
        return self.target.block_size

    async def read(self, offset: int, length: int) -> bytes:
        return await self.target.read(offset, length)

    async def write(self, offset: int, data: bytes, *, fua: bool = False) -> None:
        await self.target.write(offset, data, fua=fua)

    async def write_zeroes(self, offset: int, length: int, *, fua: bool = False) -> None:
        await self.target.write_zeroes(offset, length, fua=fua)

    async def trim(self, offset: int, length: int) -> None:
        await self.target.trim(offset, length)

    async def flush(self) -> None:
        await self.target.flush()

    def present(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        return self.target.present(offset, length)

    def allocated(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        return self.target.allocated(offset, length)

    # The NBD sessions' fast paths, looked up per request: forward when the target has them.
    def file_extent(self, offset: int, length: int) -> tuple[int, int] | None:
        fn = getattr(self.target, "file_extent", None)
        return cast("tuple[int, int] | None", fn(offset, length)) if fn else None

    def write_nowait(self, offset: int, data: bytes | memoryview) -> bool:
        fn = getattr(self.target, "write_nowait", None)
        return bool(fn(offset, data)) if fn else False


@dataclass
class VolumeEntry:
    id: str
    account: str
    name: str
    dir: Path
    volume: Volume
    ref: DeviceRef
    meta: dict[str, Any]
    lazy: LazyVolume | None = None
    attached: AttachedVolume | None = None
    busy: asyncio.Lock = field(default_factory=asyncio.Lock)

    def save(self) -> None:
        tmp = self.dir / "meta.json.tmp"
        tmp.write_text(json.dumps(self.meta, indent=1, sort_keys=True))
        os.replace(tmp, self.dir / "meta.json")


def int_field(p: dict[str, Any], key: str) -> int:
    try:
        return int(p[key])
    except (KeyError, TypeError, ValueError):
        raise RequestError(f"{key} must be an integer") from None


def opt_str(p: Path | None) -> str | None:
    return str(p) if p is not None else None


def check_source(source: dict[str, Any]) -> dict[str, Any]:
    missing = [k for k in ("host", "address", "port", "export") if not source.get(k)]
    if missing:
        raise RequestError(f"source lacks {', '.join(missing)}")
    return {k: source[k] for k in ("host", "address", "port", "export")}


def socket_path(agent_dir: Path) -> Path:
    """The local NBD socket; under /run when the agent dir is too deep for sun_path."""
    p = agent_dir / "nbd.sock"
    if len(str(p)) < 100:
        return p
    tag = hashlib.sha256(str(agent_dir).encode()).hexdigest()[:16]
    d = Path("/run/edgevisor") if os.access("/run", os.W_OK) else Path("/tmp")
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    return d / f"nbd-{tag}.sock"

"""The block-device contract shared by volumes, lazy volumes, the NBD server and FUSE.

Anything that stores a volume's bytes implements :class:`BlockDevice`; the NBD server
exports one, the FUSE image exposes one, a lazy volume is one whose missing blocks come
from a remote :class:`BlockDevice` (an NBD client). Offsets and lengths are in bytes and
need not be block-aligned; implementations reject ranges past ``size_bytes`` with
:class:`OutOfRange` and never write past the end.
"""

from __future__ import annotations

from typing import Protocol

from edgevisor.errors import RequestError


class OutOfRange(RequestError):
    code = "out_of_range"


class BlockDevice(Protocol):
    @property
    def size_bytes(self) -> int: ...

    @property
    def block_size(self) -> int: ...

    async def read(self, offset: int, length: int) -> bytes: ...

    async def write(self, offset: int, data: bytes, *, fua: bool = False) -> None:
        """Write; with ``fua`` the data is durable when this returns."""
        ...

    async def write_zeroes(self, offset: int, length: int, *, fua: bool = False) -> None: ...

    async def trim(self, offset: int, length: int) -> None: ...

    async def flush(self) -> None:
        """Make every completed write durable."""
        ...

    def present(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """Extents ``(offset, length, present_locally)`` covering the range (sync state)."""
        ...

    def allocated(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """Extents ``(offset, length, is_data)``; False means a hole that reads as zeroes."""
        ...

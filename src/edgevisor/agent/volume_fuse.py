"""The FUSE process's device for an agent volume (kind ``edgevisor.agent.volume_fuse:open_device``).

The agent owns every volume (see :mod:`edgevisor.agent.volumes`); the FUSE process that
exposes one as an image file reaches it as an NBD client on the agent's unix socket:

* **writes, flushes, zeroing** always go to the agent, which keeps the block bitmaps,
  journals, and mirrors writes of a lazy volume to its source;
* **reads** go to the agent while any block is missing locally (the agent fetches it);
  once the ``edgevisor:sync`` context reports every block present, they are served
  straight from the volume's data file with ``pread``. That is safe for good: a present
  block never becomes missing again, the agent writes the same file (one page cache, so a
  write acknowledged by the agent is visible to the next ``pread``), and a volume cannot
  be removed while it is mounted. It saves a round trip through two Python processes per
  request (reads of a full volume run at the speed of the plain ``volume`` kind);
* a lost connection (the agent restarts) is retried for up to ``wait_s`` seconds, so a
  mount rides out an agent restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator
from typing import Any, cast

from edgevisor.errors import PeerUnavailable
from edgevisor.proto.nbd_wire import CTX_EDGEVISOR_SYNC
from edgevisor.storage.blockdev import BlockDevice, OutOfRange
from edgevisor.storage.nbd_client import NBDClient

__all__ = ["KIND", "LocalDevice", "device_arg", "open_device"]

KIND = "edgevisor.agent.volume_fuse:open_device"
_CHECK_EVERY_S = 1.0
_STATUS_SPAN = 1 << 30


def device_arg(socket_path: str, export: str, data_path: str) -> str:
    """The ``--arg`` of the FUSE process for one volume."""
    return json.dumps({"socket": socket_path, "export": export, "data": data_path})


class LocalDevice:
    """A :class:`BlockDevice` backed by the agent (see the module docstring)."""

    def __init__(
        self, socket_path: str, export: str, data_path: str, client: NBDClient, wait_s: float
    ) -> None:
        self._socket = socket_path
        self._export = export
        self._data_path = data_path
        self._client: NBDClient | None = client
        self._wait_s = wait_s
        self._size = client.size_bytes
        self._bs = client.block_size
        self._lock = asyncio.Lock()
        self._fd: int | None = None
        self._next_check = 0.0

    @classmethod
    async def open(
        cls, socket_path: str, export: str, data_path: str, wait_s: float = 60.0
    ) -> LocalDevice:
        client = await cls._connect(socket_path, export)
        dev = cls(socket_path, export, data_path, client, wait_s)
        await dev._check_complete()
        return dev

    @staticmethod
    async def _connect(socket_path: str, export: str) -> NBDClient:
        return await NBDClient.connect(
            "", 0, export, unix_path=socket_path, contexts=(CTX_EDGEVISOR_SYNC,)
        )

    @property
    def size_bytes(self) -> int:
        return self._size

    @property
    def block_size(self) -> int:
        return self._bs

    @property
    def direct(self) -> bool:
        """True once reads come straight from the data file."""
        return self._fd is not None

    async def _check_complete(self) -> None:
        """Switch reads to the data file when the agent reports every block present."""
        self._next_check = time.monotonic() + _CHECK_EVERY_S
        pos = 0
        while pos < self._size:  # block status lengths are 32-bit: ask in pieces
            n = min(self._size - pos, _STATUS_SPAN)
            try:
                ext = await self._run("block_status", pos, n, CTX_EDGEVISOR_SYNC, one=True)
            except Exception:  # a corrupt volume, an old agent: keep reading via the agent
                return
            if not ext or ext[0][1] < n or ext[0][2] != 0:
                return
            pos += n
        if self._fd is None:
            self._fd = os.open(self._data_path, os.O_RDONLY | os.O_CLOEXEC)

    async def _get(self, deadline: float) -> NBDClient:
        async with self._lock:
            while self._client is None:
                try:
                    self._client = await self._connect(self._socket, self._export)
                except PeerUnavailable:
                    if time.monotonic() >= deadline:
                        raise
                    await asyncio.sleep(0.2)
            return self._client

    async def _run(self, op: str, *args: Any, **kw: Any) -> Any:
        deadline = time.monotonic() + self._wait_s
        while True:
            client = await self._get(deadline)
            try:
                return await getattr(client, op)(*args, **kw)
            except PeerUnavailable:
                if self._client is client:
                    self._client = None
                    with contextlib.suppress(Exception):
                        await client.aclose()
                if time.monotonic() >= deadline:
                    raise

    async def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self._size:
            raise OutOfRange(f"read {offset}+{length} past the end ({self._size})")
        if self._fd is None and time.monotonic() >= self._next_check:
            await self._check_complete()
        if self._fd is not None:
            return os.pread(self._fd, length, offset)
        return cast(bytes, await self._run("read", offset, length))

    async def write(self, offset: int, data: bytes, *, fua: bool = False) -> None:
        await self._run("write", offset, data, fua=fua)

    async def write_zeroes(self, offset: int, length: int, *, fua: bool = False) -> None:
        await self._run("write_zeroes", offset, length, fua=fua)

    async def trim(self, offset: int, length: int) -> None:
        await self._run("trim", offset, length)

    async def flush(self) -> None:
        await self._run("flush")

    def present(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        return [(offset, length, True)]  # the FUSE process never asks; reads fetch anyway

    def allocated(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        return [(offset, length, True)]

    async def aclose(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None


@contextlib.asynccontextmanager
async def open_device(arg: str) -> AsyncIterator[BlockDevice]:
    """FUSE device factory: ``arg`` from :func:`device_arg`."""
    cfg = json.loads(arg)
    dev = await LocalDevice.open(cfg["socket"], cfg["export"], cfg["data"])
    try:
        yield dev
    finally:
        await dev.aclose()

"""The parts of a lazy volume that stand alone: settings, progress, the fill's rate
limit, the source protocol and its error (:mod:`edgevisor.storage.lazy` re-exports them)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from edgevisor.errors import PeerUnavailable

__all__ = ["LazySettings", "Progress", "RemoteSource", "SourceUnavailable", "TokenBucket"]


class SourceUnavailable(PeerUnavailable):
    """The source did not answer within ``fetch_timeout_s``."""

    code = "source_unavailable"


class RemoteSource(Protocol):
    """What a lazy volume needs from its source (an :class:`NBDClient` fits).

    The ``connect`` callable given to :class:`LazyVolume` is also awaited on the fill
    lanes' own event loops (threads), so it must not touch objects bound to the caller's
    loop; a source may offer ``read_into(offset, buffer)`` for zero-copy fill reads.
    """

    @property
    def size_bytes(self) -> int: ...

    async def read(self, offset: int, length: int) -> bytes: ...

    async def write(self, offset: int, data: bytes, *, fua: bool = False) -> None: ...

    async def flush(self) -> None: ...

    async def aclose(self) -> None: ...


class LazySettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    fetch_timeout_s: float = Field(
        30.0,
        ge=0,
        description=(
            "How long a read, a synchronously mirrored write or a flush waits for an "
            "absent source before EIO."
        ),
    )
    reconnect_interval_s: float = Field(
        0.2, gt=0, description="Pause between attempts to reach an absent source."
    )
    fill_batch_blocks: int = Field(
        16, ge=1, le=512, description="Blocks per background fill request."
    )
    fill_inflight: int = Field(8, ge=1, le=256, description="Fill requests in flight at once.")
    fill_connections: int = Field(
        2,
        ge=0,
        le=16,
        description=(
            "Connections to the source used only by the fill, each on its own thread "
            "(0: the fill shares the main connection on the owning loop)."
        ),
    )
    fill_rate_bytes_per_s: int = Field(
        0, ge=0, description="Background fill rate limit in bytes/s (0: unlimited)."
    )
    mirror: Literal["off", "async", "sync"] = Field(
        "sync", description="Mirror local writes to the source: off, async or sync."
    )
    flush_every_blocks: int = Field(
        1024, ge=1, description="Fill flushes data + present bits after this many blocks."
    )


@dataclass(frozen=True)
class Progress:
    bytes_present: int
    bytes_total: int
    rate_bytes_per_s: float
    eta_s: float | None

    @property
    def done(self) -> bool:
        return self.bytes_present >= self.bytes_total


class TokenBucket:
    """The fill's rate limit (``rate`` 0: unlimited); ``rate`` may change at any time."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.tokens = float(rate)
        self.t = time.monotonic()

    async def take(self, n: int) -> None:
        while True:
            if self.rate <= 0:  # re-read each time: the rate may change while waiting
                return
            now = time.monotonic()
            self.tokens = min(float(max(self.rate, n)), self.tokens + (now - self.t) * self.rate)
            self.t = now
            if self.tokens >= n:
                self.tokens -= n
                return
            await asyncio.sleep((n - self.tokens) / self.rate)

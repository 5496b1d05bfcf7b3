"""Prepared records updates waiting for their commit (``records.prepare`` / ``commit``).

Theory of operation
-------------------
In a fenced move the new host may apply only after the old host acknowledged. To take
the new host's work off that critical path the controller sends it, while the old host
applies, a *prepare*: the same ``records.apply`` body and a token. The agent validates
and parses it and keeps it here, touching nothing in the kernel (so fencing holds: the
new host translates nothing yet). After the old host's ack, a *commit* naming the token
makes the agent apply what it staged; the commit frame is tiny and the agent is awake.

States of a token: absent -> staged (``put``) -> taken (``take``: committed) or expired
(``ttl_s`` after ``put``: dropped at the next ``put``/``take``). A token is taken at most
once; a commit that finds no staged entry is refused (the controller then sends the full
apply), so a late or repeated commit never applies twice from here. The table holds at
most ``max_entries`` (the oldest go first): a controller that prepares and never commits
costs bounded memory.

Pure: time comes in as ``now`` (seconds, monotonic).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["PREPARE_TTL_S", "Staging"]

#: A prepare not committed within this long is dropped (a move's commit follows its
#: prepare by one round trip to the old host; the push timeout is seconds).
PREPARE_TTL_S = 10.0

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class _Entry(Generic[T]):
    expires: float
    item: T


class Staging(Generic[T]):
    """Staged items by token, each taken at most once, expiring ``ttl_s`` after staging."""

    def __init__(self, ttl_s: float = PREPARE_TTL_S, max_entries: int = 256) -> None:
        if ttl_s <= 0 or max_entries < 1:
            raise ValueError("ttl_s must be > 0 and max_entries >= 1")
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._items: OrderedDict[str, _Entry[T]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def _expire(self, now: float) -> None:
        # Entries are in staging order and share one TTL: the expired ones lead.
        while self._items:
            token, entry = next(iter(self._items.items()))
            if entry.expires > now:
                return
            del self._items[token]

    def put(self, token: str, item: T, now: float) -> None:
        """Stage ``item`` under ``token`` (a token staged again is replaced)."""
        self._expire(now)
        self._items.pop(token, None)
        self._items[token] = _Entry(now + self.ttl_s, item)
        while len(self._items) > self.max_entries:
            self._items.popitem(last=False)

    def take(self, token: str, now: float) -> T | None:
        """The item staged under ``token`` and not expired, removed; else None."""
        self._expire(now)
        entry = self._items.pop(token, None)
        return None if entry is None else entry.item

"""Idempotency keys of calls: one call per key, also for callers that race on it.

A key maps to the id of the call it started. A key not seen in memory is looked up in the
journal once; while that lookup (and the caller's submission that follows) is in flight,
other callers with the same key wait for its outcome instead of starting a second call:
the first caller holds a *claim* it settles with its call id, or abandons when the
submission failed (the waiters then get the same error, and the key stays free).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["IdempotencyIndex"]

#: Looks a key up in the journal: the record of its call (anything with ``.id``) or None.
Lookup = Callable[[str], Awaitable[Any]]


class IdempotencyIndex:
    """Keys -> call ids in memory, backed by the journal (see the module doc)."""

    def __init__(self, journal_lookup: Lookup) -> None:
        self._lookup = journal_lookup
        self._ids: dict[str, str] = {}
        self._pending: dict[str, asyncio.Future[str]] = {}

    def remember(self, key: str, call_id: str) -> None:
        self._ids[key] = call_id

    def forget(self, key: str) -> None:
        """Drop a key from memory (its record left memory; the journal still has it)."""
        self._ids.pop(key, None)

    async def lookup(self, key: str) -> tuple[str | None, asyncio.Future[str] | None]:
        """(existing call id, None) or (None, a claim the caller settles or abandons)."""
        cid = self._ids.get(key)
        if cid is not None:
            return cid, None
        pending = self._pending.get(key)
        if pending is not None:
            return await asyncio.shield(pending), None
        claim: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        claim.add_done_callback(lambda f: f.cancelled() or f.exception())  # no "never retrieved"
        self._pending[key] = claim
        try:
            rec = await self._lookup(key)
        except BaseException as exc:
            del self._pending[key]
            claim.set_exception(exc)
            raise
        if rec is not None:
            del self._pending[key]
            self._ids[key] = rec.id
            claim.set_result(rec.id)
            return rec.id, None
        claim.add_done_callback(lambda _f: self._pending.pop(key, None))
        return None, claim

    def settle(self, key: str, claim: asyncio.Future[str], call_id: str) -> None:
        """The claimed key started ``call_id``; waiters get that id."""
        self._ids[key] = call_id
        claim.set_result(call_id)

    def abandon(self, key: str, claim: asyncio.Future[str], exc: BaseException) -> None:
        """The submission under the claim failed: waiters get its error, the key stays free."""
        self._ids.pop(key, None)
        if isinstance(exc, Exception):
            claim.set_exception(exc)
        else:
            claim.cancel()

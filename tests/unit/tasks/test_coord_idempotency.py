"""Idempotency keys: one call per key, also for callers racing on a key not yet known."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from edgevisor.tasks.calls import cap_logs
from edgevisor.tasks.idempotency import IdempotencyIndex


class Journal:
    def __init__(self, known: dict[str, str]) -> None:
        self.known = known
        self.lookups = 0
        self.gate = asyncio.Event()

    async def lookup(self, key: str) -> Any:
        self.lookups += 1
        await self.gate.wait()
        cid = self.known.get(key)
        return None if cid is None else SimpleNamespace(id=cid)


async def test_racing_callers_wait_for_the_first_claim() -> None:
    j = Journal({})
    idx = IdempotencyIndex(j.lookup)
    first = asyncio.create_task(idx.lookup("k"))
    await asyncio.sleep(0)
    second = asyncio.create_task(idx.lookup("k"))
    await asyncio.sleep(0)
    j.gate.set()
    existing, claim = await first
    assert existing is None and claim is not None
    assert not second.done()  # waits for the first caller's submission
    idx.settle("k", claim, "call-1")
    assert await second == ("call-1", None)
    assert await idx.lookup("k") == ("call-1", None)
    assert j.lookups == 1


async def test_an_abandoned_claim_fails_the_waiters_and_frees_the_key() -> None:
    j = Journal({})
    j.gate.set()
    idx = IdempotencyIndex(j.lookup)
    _, claim = await idx.lookup("k")
    assert claim is not None
    waiter = asyncio.create_task(idx.lookup("k"))
    await asyncio.sleep(0)
    idx.abandon("k", claim, RuntimeError("queue full"))
    with pytest.raises(RuntimeError, match="queue full"):
        await waiter
    again, claim2 = await idx.lookup("k")  # free again: a new claim, not an old id
    assert again is None and claim2 is not None


async def test_keys_come_back_from_the_journal_after_they_left_memory() -> None:
    j = Journal({"k": "call-9"})
    j.gate.set()
    idx = IdempotencyIndex(j.lookup)
    idx.remember("k", "call-9")
    idx.forget("k")
    assert await idx.lookup("k") == ("call-9", None)
    assert j.lookups == 1


def test_logs_are_capped_in_bytes_on_a_character_boundary() -> None:
    assert cap_logs("short", 100) == "short"
    capped = cap_logs("é" * 100, 11)  # 2 bytes each: 5 whole characters fit
    assert capped == "é" * 5 + "\n[logs truncated]"

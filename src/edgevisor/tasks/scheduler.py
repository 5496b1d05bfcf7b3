"""The host's call queue and the pure, synchronous scheduling decision.

Theory of operation
-------------------
Every pending call belongs to a *task key* (one deployed task version). All calls of a
key declare the same demand (memory, CPU), so a key is one "resource class": if its head
call does not fit, none of its calls do. The queue is therefore:

* per key, a FIFO deque per priority level (the head is the front of the highest level);
* a *ready heap* over keys that have pending calls and are below their concurrency cap,
  keyed by their head's ``(-priority, seq)``; entries are invalidated lazily by a token;
* an *age heap* over all pending calls keyed by enqueue time (lazy deletion).

``decide(free, now)`` first looks at the globally oldest pending call. If it has waited
``aging_s`` or more and its key is below its cap, it goes first when it fits; when it
does not fit it becomes a *barrier*: nothing is dispatched, so running calls drain and
free the memory it needs (no starvation of big calls by a stream of small ones, nor of
low-priority calls by high-priority ones). Otherwise keys are popped from the ready heap
in priority/FIFO order; a key whose demand does not fit the remaining budget is set
aside (so smaller calls pass it) and pushed back at the end. The work per dispatched call
is a few heap operations on heaps of size #keys and #pending, so it stays flat from
hundreds to tens of thousands of queued calls; the work for keys that do not fit is
proportional to the number of distinct keys waiting, not to the number of calls.

The scheduler does no I/O and reads no clock: ``now`` comes in as an argument and the
caller reports completions with :meth:`Scheduler.complete`.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass

from edgevisor.errors import TooManyRequests

__all__ = ["Demand", "Dispatch", "Resources", "Scheduler"]


@dataclass(frozen=True, slots=True)
class Demand:
    """What one call of a task holds while it runs."""

    memory_mb: int
    cpu_milli: int  # thousandths of a core, so budgets add up exactly


@dataclass(frozen=True, slots=True)
class Resources:
    """A budget: free or total memory, CPU and environment slots."""

    memory_mb: int
    cpu_milli: int
    envs: int


@dataclass(frozen=True, slots=True)
class Dispatch:
    call_id: str
    task: str
    demand: Demand


class _Pending:
    __slots__ = ("call_id", "enqueued_at", "priority", "seq", "task")

    def __init__(self, call_id: str, task: str, priority: int, enqueued_at: float, seq: int):
        self.call_id = call_id
        self.task = task
        self.priority = priority
        self.enqueued_at = enqueued_at
        self.seq = seq


class _Key:
    __slots__ = ("concurrency", "count", "demand", "entry", "key", "levels", "running", "token")

    def __init__(self, key: str, demand: Demand, concurrency: int) -> None:
        self.key = key
        self.demand = demand
        self.concurrency = concurrency
        self.running = 0
        self.count = 0
        self.levels: dict[int, deque[_Pending]] = {}
        self.token = 0
        self.entry: tuple[int, int] | None = None  # (-priority, seq) of the valid heap entry

    def head(self) -> _Pending:
        return self.levels[max(self.levels)][0]


class Scheduler:
    """Pending calls of one host across all task keys; see the module docstring."""

    def __init__(
        self,
        capacity: Resources,
        *,
        aging_s: float = 10.0,
        queue_bound: int = 10_000,
        retry_after_s: float = 1.0,
    ) -> None:
        self.capacity = capacity
        self.aging_s = aging_s
        self.queue_bound = queue_bound
        self.retry_after_s = retry_after_s
        self._keys: dict[str, _Key] = {}
        self._pending: dict[str, _Pending] = {}
        self._ready: list[tuple[int, int, int, str]] = []  # (-prio, seq, token, key)
        self._age: list[tuple[float, int, str]] = []  # (enqueued_at, seq, call_id)
        self._seq = 0

    # -- tasks ---------------------------------------------------------------------------

    def set_task(self, key: str, demand: Demand, concurrency: int) -> None:
        """Register a task key or update its demand/cap."""
        if demand.memory_mb > self.capacity.memory_mb or demand.cpu_milli > self.capacity.cpu_milli:
            raise ValueError(f"{key}: demand {demand} exceeds the host capacity {self.capacity}")
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        k = self._keys.get(key)
        if k is None:
            self._keys[key] = _Key(key, demand, concurrency)
            return
        k.demand, k.concurrency = demand, concurrency
        self._refresh(k)

    def remove_task(self, key: str) -> list[str]:
        """Forget a key; returns the ids of its pending calls, which are dropped."""
        k = self._keys.pop(key, None)
        if k is None:
            return []
        dropped = [p.call_id for level in k.levels.values() for p in level]
        for cid in dropped:
            del self._pending[cid]
        k.token += 1
        return dropped

    def has_task(self, key: str) -> bool:
        return key in self._keys

    # -- calls ---------------------------------------------------------------------------

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    def running(self, key: str) -> int:
        k = self._keys.get(key)
        return k.running if k else 0

    def is_pending(self, call_id: str) -> bool:
        return call_id in self._pending

    def check_room(self) -> None:
        """Raise TooManyRequests when ``queue_bound`` calls are pending."""
        if len(self._pending) >= self.queue_bound:
            raise TooManyRequests(
                f"queue full: {len(self._pending)} calls pending",
                retry_after_s=self.retry_after_s,
            )

    def enqueue(
        self, call_id: str, key: str, priority: int, now: float, *, force: bool = False
    ) -> None:
        """Queue a call. Past ``queue_bound`` pending calls raise TooManyRequests."""
        if not force:
            self.check_room()
        k = self._keys[key]
        if call_id in self._pending:
            raise ValueError(f"call {call_id} is already queued")
        self._seq += 1
        p = _Pending(call_id, key, priority, now, self._seq)
        self._pending[call_id] = p
        level = k.levels.get(priority)
        if level is None:
            level = k.levels[priority] = deque()
        level.append(p)
        k.count += 1
        heapq.heappush(self._age, (now, p.seq, call_id))
        if k.entry is None or -priority < k.entry[0]:
            self._refresh(k)

    def cancel(self, call_id: str) -> bool:
        """Take a pending call out of the queue; False if it is not pending (any more)."""
        p = self._pending.pop(call_id, None)
        if p is None:
            return False
        k = self._keys[p.task]
        level = k.levels[p.priority]
        level.remove(p)  # O(length of its level); cancellation is rare
        if not level:
            del k.levels[p.priority]
        k.count -= 1
        self._refresh(k)
        return True

    def complete(self, key: str) -> None:
        """A dispatched call of ``key`` finished (in any way)."""
        k = self._keys.get(key)
        if k is None:
            return
        was_capped = k.running >= k.concurrency
        k.running -= 1
        if was_capped and k.running < k.concurrency:
            self._refresh(k)

    # -- decision ------------------------------------------------------------------------

    def decide(self, free: Resources, now: float) -> list[Dispatch]:
        """Select calls that fit ``free``; mutates the queue (selected calls are running)."""
        out: list[Dispatch] = []
        mem, cpu, envs = free.memory_mb, free.cpu_milli, free.envs
        age = self._age
        pending = self._pending
        # 1. aged calls first; an aged call that does not fit is a barrier
        while age and envs > 0:
            _, seq, call_id = age[0]
            p = pending.get(call_id)
            if p is None or p.seq != seq:
                heapq.heappop(age)
                continue
            if now - p.enqueued_at < self.aging_s:
                break
            k = self._keys[p.task]
            if k.running >= k.concurrency:
                break  # its cap frees as calls finish; memory is not what holds it
            d = k.demand
            if d.memory_mb > mem or d.cpu_milli > cpu:
                return out
            heapq.heappop(age)
            level = k.levels[p.priority]
            assert level[0] is p  # the oldest call of a key is the front of its level
            self._take(k, p.priority)
            mem -= d.memory_mb
            cpu -= d.cpu_milli
            envs -= 1
            out.append(Dispatch(p.call_id, k.key, d))
        # 2. priority/FIFO order across keys; keys that do not fit are passed
        ready = self._ready
        aside: list[tuple[int, int, int, str]] = []
        keys = self._keys
        while ready and envs > 0:
            entry = heapq.heappop(ready)
            k2 = keys.get(entry[3])
            if k2 is None or entry[2] != k2.token:
                continue
            d = k2.demand
            if d.memory_mb > mem or d.cpu_milli > cpu:
                aside.append(entry)
                continue
            k2.entry = None
            prio = -entry[0]
            p = self._take(k2, prio)
            mem -= d.memory_mb
            cpu -= d.cpu_milli
            envs -= 1
            out.append(Dispatch(p.call_id, k2.key, d))
        for entry in aside:
            heapq.heappush(ready, entry)
        return out

    # -- internals -----------------------------------------------------------------------

    def _take(self, k: _Key, priority: int) -> _Pending:
        level = k.levels[priority]
        p = level.popleft()
        if not level:
            del k.levels[priority]
        k.count -= 1
        k.running += 1
        del self._pending[p.call_id]
        self._refresh(k)
        return p

    def _refresh(self, k: _Key) -> None:
        """Make the ready heap hold exactly one valid entry for ``k`` if it can run."""
        k.token += 1
        if k.count and k.running < k.concurrency:
            h = k.head()
            k.entry = (-h.priority, h.seq)
            heapq.heappush(self._ready, (-h.priority, h.seq, k.token, k.key))
        else:
            k.entry = None

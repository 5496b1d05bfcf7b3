"""The pure resource manager: which environment runs a dispatched call.

Theory of operation
-------------------
The host has a budget (memory, CPU, number of environments). Every environment reserves
its task's memory and one slot for as long as it exists; CPU is reserved only while it
runs a call. An environment is in one of three states::

    STARTING (prewarm, no call) --started(ok)--> IDLE <--release(healthy)-- BUSY
    IDLE --place(same key)--> BUSY          (Reuse: the warm path)
    place(other key) --------------------> BUSY (Create)
    IDLE --keep-warm idle time over--> gone (Expire)
    IDLE --budget needed by a call--> gone (Evict, least recently used first)
    BUSY --release(unhealthy | retired | no keep-warm)--> gone (Evict)

The scheduler is given :meth:`ResourceManager.free_for_calls`, which counts idle
environments as free (they can be evicted), so every dispatch it returns can be placed:
:meth:`ResourceManager.place` reuses an idle environment of the same key, else evicts idle
ones (LRU) until the new one fits, and creates it. Prewarming only uses budget that is free
without evicting anything. No method does I/O or reads a clock; each returns the actions
the service performs (create/close environments, run calls).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from enum import Enum
from typing import Literal

from edgevisor.tasks.scheduler import Demand, Dispatch, Resources

__all__ = ["Action", "Create", "EnvState", "Evict", "Expire", "ResourceManager", "Reuse"]


@dataclass(frozen=True, slots=True)
class Create:
    """Start a new environment for ``key``; run ``call_id`` in it (None: prewarm)."""

    env_id: int
    key: str
    call_id: str | None


@dataclass(frozen=True, slots=True)
class Reuse:
    """Run ``call_id`` in the idle (warm) environment ``env_id``."""

    env_id: int
    key: str
    call_id: str


@dataclass(frozen=True, slots=True)
class Evict:
    """Close ``env_id`` now: its budget is needed, it is unhealthy, or its task is gone."""

    env_id: int
    key: str
    reason: Literal["budget", "unhealthy", "retired", "no_keep_warm"]


@dataclass(frozen=True, slots=True)
class Expire:
    """Close ``env_id``: it stayed idle longer than its keep-warm time."""

    env_id: int
    key: str


Action = Create | Reuse | Evict | Expire


class EnvState(Enum):
    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"


class _Env:
    __slots__ = ("demand", "env_id", "key", "last_used", "state")

    def __init__(self, env_id: int, key: str, demand: Demand, state: EnvState, now: float):
        self.env_id = env_id
        self.key = key
        self.demand = demand
        self.state = state
        self.last_used = now


@dataclass
class _KeyPolicy:
    demand: Demand
    idle_s: float
    prewarm: int
    retired: bool = False


class ResourceManager:
    """Host budget, warm pools per task key, eviction and keep-warm; see module docstring."""

    def __init__(self, capacity: Resources) -> None:
        self.capacity = capacity
        self._keys: dict[str, _KeyPolicy] = {}
        self._envs: dict[int, _Env] = {}
        self._idle: dict[str, list[int]] = {}  # per key, most recently used last
        self._lru: OrderedDict[int, None] = OrderedDict()  # all idle envs, oldest first
        self._mem_used = 0  # memory of all environments
        self._mem_held = 0  # memory of BUSY + STARTING (not evictable)
        self._cpu_busy = 0
        self._held = 0  # number of BUSY + STARTING
        self._next_id = 0

    # -- keys ----------------------------------------------------------------------------

    def register(self, key: str, demand: Demand, *, idle_s: float, prewarm: int = 0) -> None:
        self._keys[key] = _KeyPolicy(demand, idle_s, prewarm)

    def retire(self, key: str) -> list[Action]:
        """The key is removed or superseded: close its idle envs; busy ones on release."""
        pol = self._keys.get(key)
        if pol is None:
            return []
        pol.retired = True
        out: list[Action] = []
        for env_id in list(self._idle.get(key, [])):
            self._drop(env_id)
            out.append(Evict(env_id, key, "retired"))
        self._forget_if_unused(key)
        return out

    # -- queries -------------------------------------------------------------------------

    def free_for_calls(self) -> Resources:
        """Budget the scheduler may hand out: idle environments count as free."""
        return Resources(
            self.capacity.memory_mb - self._mem_held,
            self.capacity.cpu_milli - self._cpu_busy,
            self.capacity.envs - self._held,
        )

    def state(self, env_id: int) -> EnvState | None:
        env = self._envs.get(env_id)
        return env.state if env else None

    def envs(self, key: str | None = None) -> list[tuple[int, str, EnvState]]:
        return [
            (e.env_id, e.key, e.state) for e in self._envs.values() if key is None or e.key == key
        ]

    def usage(self) -> Resources:
        """Memory of all envs, CPU of busy ones, number of envs."""
        return Resources(self._mem_used, self._cpu_busy, len(self._envs))

    def next_deadline(self) -> float | None:
        """Earliest time an idle environment's keep-warm runs out (for the timer)."""
        best: float | None = None
        for key, ids in self._idle.items():
            pol = self._keys.get(key)
            if pol is None:
                continue
            for env_id in ids[: max(0, len(ids) - pol.prewarm)]:
                t = self._envs[env_id].last_used + pol.idle_s
                if best is None or t < best:
                    best = t
        return best

    # -- decisions -----------------------------------------------------------------------

    def place(self, dispatches: list[Dispatch], now: float) -> list[Action]:
        """Give every dispatched call an environment: reuse a warm one or create one."""
        out: list[Action] = []
        for d in dispatches:
            idle = self._idle.get(d.task)
            if idle:
                env_id = idle.pop()
                del self._lru[env_id]
                env = self._envs[env_id]
                env.state = EnvState.BUSY
                self._hold(env)
                out.append(Reuse(env_id, d.task, d.call_id))
                continue
            need = d.demand.memory_mb
            while (
                self._mem_used + need > self.capacity.memory_mb
                or len(self._envs) + 1 > self.capacity.envs
            ):
                if not self._lru:
                    raise AssertionError("dispatch does not fit the budget: scheduler bug")
                victim = next(iter(self._lru))
                vkey = self._envs[victim].key
                self._drop(victim)
                out.append(Evict(victim, vkey, "budget"))
            env = self._new(d.task, d.demand, EnvState.BUSY, now)
            out.append(Create(env.env_id, d.task, d.call_id))
        return out

    def release(self, env_id: int, *, healthy: bool, now: float) -> list[Action]:
        """A call finished in ``env_id``; keep it warm or close it."""
        env = self._envs.get(env_id)
        if env is None:
            return []
        pol = self._keys.get(env.key)
        reason: Literal["unhealthy", "retired", "no_keep_warm"] | None = None
        if not healthy:
            reason = "unhealthy"
        elif pol is None or pol.retired:
            reason = "retired"
        elif pol.idle_s <= 0 and pol.prewarm == 0:
            reason = "no_keep_warm"
        if reason is not None:
            key = env.key
            self._drop(env_id)
            self._forget_if_unused(key)
            return [Evict(env_id, key, reason)]
        self._unhold(env)
        env.state = EnvState.IDLE
        env.last_used = now
        self._idle.setdefault(env.key, []).append(env_id)
        self._lru[env_id] = None
        return []

    def started(self, env_id: int, *, ok: bool, now: float) -> list[Action]:
        """A prewarm environment finished starting (or failed to)."""
        env = self._envs.get(env_id)
        if env is None or env.state is not EnvState.STARTING:
            return []
        return self.release(env_id, healthy=ok, now=now)

    def housekeep(self, now: float) -> list[Action]:
        """Expire idle environments past keep-warm; start prewarm ones that fit."""
        out: list[Action] = []
        for key, ids in list(self._idle.items()):
            pol = self._keys.get(key)
            if pol is None:
                continue
            expendable = ids[: max(0, len(ids) - pol.prewarm)]
            for env_id in expendable:
                if self._envs[env_id].last_used + pol.idle_s <= now:
                    self._drop(env_id)
                    out.append(Expire(env_id, key))
        for key, pol in self._keys.items():
            if pol.retired or pol.prewarm == 0:
                continue
            have = sum(
                1 for e in self._envs.values() if e.key == key and e.state is not EnvState.BUSY
            )
            while (
                have < pol.prewarm
                and self._mem_used + pol.demand.memory_mb <= self.capacity.memory_mb
                and len(self._envs) < self.capacity.envs
            ):
                env = self._new(key, pol.demand, EnvState.STARTING, now)
                out.append(Create(env.env_id, key, None))
                have += 1
        for key in [k for k, p in self._keys.items() if p.retired]:
            self._forget_if_unused(key)
        return out

    # -- internals -----------------------------------------------------------------------

    def _new(self, key: str, demand: Demand, state: EnvState, now: float) -> _Env:
        self._next_id += 1
        env = _Env(self._next_id, key, demand, state, now)
        self._envs[env.env_id] = env
        self._mem_used += demand.memory_mb
        self._hold(env)
        return env

    def _hold(self, env: _Env) -> None:
        self._mem_held += env.demand.memory_mb
        self._held += 1
        if env.state is EnvState.BUSY:
            self._cpu_busy += env.demand.cpu_milli

    def _unhold(self, env: _Env) -> None:
        self._mem_held -= env.demand.memory_mb
        self._held -= 1
        if env.state is EnvState.BUSY:
            self._cpu_busy -= env.demand.cpu_milli

    def _drop(self, env_id: int) -> None:
        env = self._envs.pop(env_id)
        self._mem_used -= env.demand.memory_mb
        if env.state is EnvState.IDLE:
            self._idle[env.key].remove(env_id)
            if not self._idle[env.key]:
                del self._idle[env.key]
            del self._lru[env_id]
        else:
            self._unhold(env)

    def _forget_if_unused(self, key: str) -> None:
        pol = self._keys.get(key)
        if pol is not None and pol.retired and not any(e.key == key for e in self._envs.values()):
            del self._keys[key]

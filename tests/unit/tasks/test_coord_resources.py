"""The pure resource manager: warm reuse, LRU eviction, keep-warm expiry, prewarm."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgevisor.tasks.resources import Create, EnvState, Evict, Expire, ResourceManager, Reuse
from edgevisor.tasks.scheduler import Demand, Dispatch, Resources, Scheduler

CAP = Resources(memory_mb=1000, cpu_milli=2000, envs=4)
SMALL = Demand(200, 500)
BIG = Demand(800, 1000)


def _rm(idle_s: float = 60.0, prewarm: int = 0) -> ResourceManager:
    rm = ResourceManager(CAP)
    rm.register("a", SMALL, idle_s=idle_s, prewarm=prewarm)
    rm.register("b", SMALL, idle_s=idle_s)
    rm.register("big", BIG, idle_s=idle_s)
    return rm


def test_create_then_reuse_warm_env_of_same_version() -> None:
    rm = _rm()
    [c] = rm.place([Dispatch("c1", "a", SMALL)], 0.0)
    assert isinstance(c, Create) and c.call_id == "c1" and c.key == "a"
    assert rm.free_for_calls() == Resources(800, 1500, 3)
    assert rm.release(c.env_id, healthy=True, now=1.0) == []
    assert rm.state(c.env_id) is EnvState.IDLE
    assert rm.free_for_calls() == CAP  # idle envs count as free for the scheduler
    assert rm.usage().memory_mb == 200  # but they still hold memory
    [r] = rm.place([Dispatch("c2", "a", SMALL)], 2.0)
    assert r == Reuse(c.env_id, "a", "c2")
    # another version does not reuse it
    [c3] = rm.place([Dispatch("c3", "b", SMALL)], 2.0)
    assert isinstance(c3, Create) and c3.env_id != c.env_id


def test_idle_envs_evicted_lru_when_a_call_needs_budget() -> None:
    rm = _rm()
    ids = []
    for i, key in enumerate(["a", "b", "a"]):
        [c] = rm.place([Dispatch(f"c{i}", key, SMALL)], float(i))
        ids.append(c.env_id)
    for i, env_id in enumerate(ids):
        rm.release(env_id, healthy=True, now=10.0 + i)  # LRU order: ids[0], ids[1], ids[2]
    assert rm.usage().memory_mb == 600
    actions = rm.place([Dispatch("big1", "big", BIG)], 20.0)
    # 800 MB needs 2 of the 3 idle envs gone (600 + 800 > 1000, 400 + 800 > 1000, 200 + 800 ok)
    assert actions[:2] == [Evict(ids[0], "a", "budget"), Evict(ids[1], "b", "budget")]
    assert isinstance(actions[2], Create) and actions[2].key == "big"
    assert rm.usage().memory_mb == 1000


def test_env_slot_limit_evicts_too() -> None:
    rm = ResourceManager(Resources(10_000, 10_000, 2))
    rm.register("a", SMALL, idle_s=60)
    rm.register("b", SMALL, idle_s=60)
    e = [rm.place([Dispatch(f"c{i}", "a", SMALL)], 0.0)[0].env_id for i in range(2)]
    rm.release(e[0], healthy=True, now=1.0)
    actions = rm.place([Dispatch("x", "b", SMALL)], 2.0)
    assert actions[0] == Evict(e[0], "a", "budget")
    assert len(rm.envs()) == 2


def test_keep_warm_expiry() -> None:
    rm = _rm(idle_s=30.0)
    [c] = rm.place([Dispatch("c1", "a", SMALL)], 0.0)
    rm.release(c.env_id, healthy=True, now=5.0)
    assert rm.next_deadline() == 35.0
    assert rm.housekeep(34.0) == []
    assert rm.housekeep(35.0) == [Expire(c.env_id, "a")]
    assert rm.envs() == [] and rm.next_deadline() is None


def test_unhealthy_env_is_closed_not_reused() -> None:
    rm = _rm()
    [c] = rm.place([Dispatch("c1", "a", SMALL)], 0.0)
    assert rm.release(c.env_id, healthy=False, now=1.0) == [Evict(c.env_id, "a", "unhealthy")]
    assert rm.usage() == Resources(0, 0, 0)


def test_no_keep_warm_closes_after_call() -> None:
    rm = _rm(idle_s=0.0)
    [c] = rm.place([Dispatch("c1", "a", SMALL)], 0.0)
    assert rm.release(c.env_id, healthy=True, now=1.0) == [Evict(c.env_id, "a", "no_keep_warm")]


def test_prewarm_fills_free_budget_only_and_is_not_expired() -> None:
    rm = ResourceManager(CAP)
    rm.register("a", SMALL, idle_s=10.0, prewarm=2)
    first = rm.housekeep(0.0)
    assert [type(x) for x in first] == [Create, Create]
    assert all(isinstance(x, Create) and x.call_id is None for x in first)
    assert rm.housekeep(0.0) == []  # starting ones count
    assert rm.free_for_calls().memory_mb == 600  # starting envs are not evictable
    for x in first:
        rm.started(x.env_id, ok=True, now=1.0)
    assert rm.free_for_calls() == CAP
    assert rm.housekeep(100.0) == []  # the prewarm count is kept warm past idle_s
    [r] = rm.place([Dispatch("c1", "a", SMALL)], 101.0)
    assert isinstance(r, Reuse)
    more = rm.housekeep(101.0)  # one prewarm env is now busy: start another
    assert len(more) == 1 and isinstance(more[0], Create)
    # prewarm never evicts: with the budget held by busy envs nothing is started
    rm2 = ResourceManager(Resources(400, 2000, 4))
    rm2.register("big2", Demand(400, 100), idle_s=10)
    rm2.register("a", SMALL, idle_s=10.0, prewarm=1)
    rm2.place([Dispatch("x", "big2", Demand(400, 100))], 0.0)
    assert rm2.housekeep(0.0) == []


def test_failed_prewarm_is_dropped() -> None:
    rm = ResourceManager(CAP)
    rm.register("a", SMALL, idle_s=10.0, prewarm=1)
    [c] = rm.housekeep(0.0)
    assert rm.started(c.env_id, ok=False, now=0.5) == [Evict(c.env_id, "a", "unhealthy")]
    assert rm.envs() == []


def test_retire_closes_idle_and_busy_on_release() -> None:
    rm = _rm()
    [c1] = rm.place([Dispatch("c1", "a", SMALL)], 0.0)
    [c2] = rm.place([Dispatch("c2", "a", SMALL)], 0.0)
    rm.release(c1.env_id, healthy=True, now=1.0)
    assert rm.retire("a") == [Evict(c1.env_id, "a", "retired")]
    assert rm.release(c2.env_id, healthy=True, now=2.0) == [Evict(c2.env_id, "a", "retired")]


def test_place_beyond_budget_is_a_bug() -> None:
    rm = _rm()
    rm.place([Dispatch("c1", "big", BIG)], 0.0)
    with pytest.raises(AssertionError, match="scheduler bug"):
        rm.place([Dispatch("c2", "big", BIG)], 0.0)


@settings(max_examples=80, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["call", "finish", "fail", "tick"]),
            st.sampled_from(["a", "b", "big"]),
            st.integers(0, 10),
        ),
        max_size=80,
    )
)
def test_scheduler_and_manager_together_never_exceed_budget(
    ops: list[tuple[str, str, int]],
) -> None:
    """Scheduler fed with free_for_calls(), manager placing: the host budget always holds."""
    demands = {"a": SMALL, "b": SMALL, "big": BIG}
    s = Scheduler(CAP, aging_s=3.0)
    rm = ResourceManager(CAP)
    for k, d in demands.items():
        s.set_task(k, d, 2)
        rm.register(k, d, idle_s=5.0, prewarm=1 if k == "a" else 0)
    now, n = 0.0, 0
    busy: list[tuple[int, str]] = []
    starting: set[int] = set()
    for op, key, arg in ops:
        if op == "call":
            n += 1
            s.enqueue(f"c{n}", key, 0, now)
        elif op in ("finish", "fail") and busy:
            env_id, k = busy.pop(arg % len(busy))
            s.complete(k)
            rm.release(env_id, healthy=op == "finish", now=now)
        elif op == "tick":
            now += arg
            for x in rm.housekeep(now):
                if isinstance(x, Create):
                    starting.add(x.env_id)
            for env_id in list(starting):
                rm.started(env_id, ok=True, now=now)
                starting.discard(env_id)
        for x in rm.place(s.decide(rm.free_for_calls(), now), now):
            if isinstance(x, Create | Reuse):
                assert x.call_id is not None
                busy.append((x.env_id, x.key))
        u = rm.usage()
        assert u.memory_mb <= CAP.memory_mb
        assert u.cpu_milli <= CAP.cpu_milli
        assert u.envs <= CAP.envs
        assert len({e for e, _ in busy}) == len(busy)  # one call per environment
        for env_id, _ in busy:
            assert rm.state(env_id) is EnvState.BUSY

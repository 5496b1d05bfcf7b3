"""The pure scheduler: fit-based selection, caps, priorities, aging, bound; stateful fuzzing."""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from edgevisor.errors import TooManyRequests
from edgevisor.tasks.scheduler import Demand, Dispatch, Resources, Scheduler

CAP = Resources(memory_mb=1000, cpu_milli=2000, envs=6)


def _sched(aging_s: float = 100.0, bound: int = 1000) -> Scheduler:
    s = Scheduler(CAP, aging_s=aging_s, queue_bound=bound, retry_after_s=2.5)
    s.set_task("small", Demand(100, 250), 3)
    s.set_task("big", Demand(800, 1000), 1)
    return s


def _ids(ds: list[Dispatch]) -> list[str]:
    return [d.call_id for d in ds]


def test_calls_that_fit_pass_one_that_does_not() -> None:
    s = _sched()
    s.enqueue("b1", "big", 0, 0.0)
    s.enqueue("s1", "small", 0, 1.0)
    s.enqueue("s2", "small", 0, 2.0)
    # only 500 MB free: the big call waits, the small ones pass it
    out = s.decide(Resources(500, 2000, 6), 3.0)
    assert _ids(out) == ["s1", "s2"]
    assert s.is_pending("b1")
    # memory frees: the big call goes
    assert _ids(s.decide(Resources(900, 2000, 4), 4.0)) == ["b1"]


def test_concurrency_cap_per_task() -> None:
    s = _sched()
    for i in range(5):
        s.enqueue(f"s{i}", "small", 0, float(i))
    assert _ids(s.decide(CAP, 10.0)) == ["s0", "s1", "s2"]
    assert s.decide(CAP, 11.0) == []  # capped, though budget is free
    s.complete("small")
    assert _ids(s.decide(CAP, 12.0)) == ["s3"]


def test_priorities_then_fifo() -> None:
    s = _sched()
    s.set_task("other", Demand(10, 10), 10)
    s.enqueue("a", "other", 0, 0.0)
    s.enqueue("b", "other", 5, 1.0)
    s.enqueue("c", "small", 5, 2.0)
    s.enqueue("d", "other", 0, 3.0)
    s.enqueue("e", "other", 9, 4.0)
    assert _ids(s.decide(CAP, 5.0)) == ["e", "b", "c", "a", "d"]


def test_budget_and_env_slots_respected() -> None:
    s = _sched()
    for i in range(3):
        s.enqueue(f"s{i}", "small", 0, 0.0)
    assert _ids(s.decide(Resources(1000, 2000, 2), 1.0)) == ["s0", "s1"]
    s2 = _sched()
    for i in range(3):
        s2.enqueue(f"s{i}", "small", 0, 0.0)
    assert _ids(s2.decide(Resources(1000, 600, 6), 1.0)) == ["s0", "s1"]  # 250m each


def test_aged_big_call_becomes_barrier() -> None:
    s = _sched(aging_s=5.0)
    s.enqueue("b", "big", 0, 0.0)
    s.enqueue("s1", "small", 0, 1.0)
    assert _ids(s.decide(Resources(500, 2000, 6), 2.0)) == ["s1"]  # not aged yet: s1 passes
    s.enqueue("s2", "small", 0, 3.0)
    # at t=6 the big call has waited 6 s >= 5 s: nothing passes it any more
    assert s.decide(Resources(500, 2000, 6), 6.0) == []
    assert s.is_pending("s2")
    # once the small call completes and memory frees, the big one goes first
    s.complete("small")
    assert _ids(s.decide(Resources(1000, 2000, 6), 7.0)) == ["b", "s2"]


def test_aged_low_priority_call_is_not_starved_by_high_priority() -> None:
    s = _sched(aging_s=5.0)
    s.enqueue("low", "small", 0, 0.0)
    s.enqueue("hi1", "small", 9, 1.0)
    assert _ids(s.decide(Resources(100, 2000, 6), 2.0)) == ["hi1"]
    s.complete("small")
    s.enqueue("hi2", "small", 9, 3.0)
    assert _ids(s.decide(Resources(100, 2000, 6), 6.0)) == ["low"]  # aged: goes first


def test_queue_bound_raises_with_retry_after() -> None:
    s = _sched(bound=3)
    for i in range(3):
        s.enqueue(f"s{i}", "small", 0, 0.0)
    with pytest.raises(TooManyRequests) as info:
        s.enqueue("s3", "small", 0, 0.0)
    assert info.value.retry_after_s == 2.5
    assert info.value.status == 429
    s.enqueue("forced", "small", 0, 0.0, force=True)  # recovery after restart bypasses it
    s.decide(CAP, 1.0)
    s.enqueue("s4", "small", 0, 1.0)  # room again


def test_demand_larger_than_capacity_is_refused() -> None:
    s = _sched()
    with pytest.raises(ValueError, match="exceeds the host capacity"):
        s.set_task("huge", Demand(2000, 100), 1)


def test_remove_task_drops_pending() -> None:
    s = _sched()
    s.enqueue("s1", "small", 0, 0.0)
    s.enqueue("b1", "big", 0, 0.0)
    assert s.remove_task("small") == ["s1"]
    assert s.pending_count == 1
    assert _ids(s.decide(CAP, 1.0)) == ["b1"]
    s.complete("small")  # a call of a removed task finishing is ignored


def test_starvation_without_aging_and_none_with_it() -> None:
    """Small calls arriving back to back keep 500 MB busy; a 800 MB call needs it free."""

    def run(aging_s: float) -> float | None:
        s = _sched(aging_s=aging_s)
        s.set_task("small", Demand(100, 100), 10)
        running: list[tuple[float, str]] = []  # (end, key)
        n = 0
        t = 0.0
        while t < 60.0:
            if t == 1.0:  # arrives once the stream of small calls holds memory
                s.enqueue("big", "big", 0, t)
            # a new small call every 0.1 s, each runs 0.5 s: 5 always overlap
            s.enqueue(f"s{n}", "small", 0, t)
            n += 1
            while running and running[0][0] <= t:
                _, key = heapq.heappop(running)
                s.complete(key)
            used = sum(800 if k == "big" else 100 for _, k in running)
            free = Resources(CAP.memory_mb - used, 2000, 100)
            for d in s.decide(free, t):
                if d.call_id == "big":
                    return t
                heapq.heappush(running, (t + 0.5, d.task))
            t = round(t + 0.1, 3)
        return None

    assert run(aging_s=1e9) is None  # the big call starves
    started = run(aging_s=3.0)
    assert started is not None and 1.0 + 3.0 <= started <= 1.0 + 3.0 + 0.5 + 0.2


# -- stateful fuzzing ----------------------------------------------------------------------

TASKS = {
    "small": (Demand(100, 250), 3),
    "medium": (Demand(300, 500), 2),
    "big": (Demand(800, 1000), 1),
    "huge": (Demand(1000, 2000), 1),
}
AGING = 5.0
BOUND = 25


@dataclass(order=True)
class _P:
    t: float
    seq: int
    call_id: str = field(compare=False)
    key: str = field(compare=False)
    prio: int = field(compare=False)


class SchedulerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.s = Scheduler(CAP, aging_s=AGING, queue_bound=BOUND)
        for key, (demand, cap) in TASKS.items():
            self.s.set_task(key, demand, cap)
        self.now = 0.0
        self.seq = 0
        self.pending: dict[str, _P] = {}
        self.running: list[tuple[str, str]] = []  # (call_id, key)

    def _free(self) -> Resources:
        mem = sum(TASKS[k][0].memory_mb for _, k in self.running)
        cpu = sum(TASKS[k][0].cpu_milli for _, k in self.running)
        return Resources(CAP.memory_mb - mem, CAP.cpu_milli - cpu, CAP.envs - len(self.running))

    def _running_of(self, key: str) -> int:
        return sum(1 for _, k in self.running if k == key)

    @rule(key=st.sampled_from(sorted(TASKS)), prio=st.sampled_from([0, 0, 0, 1, 5]))
    def enqueue(self, key: str, prio: int) -> None:
        self.seq += 1
        cid = f"c{self.seq}"
        if len(self.pending) >= BOUND:
            with pytest.raises(TooManyRequests):
                self.s.enqueue(cid, key, prio, self.now)
            return
        self.s.enqueue(cid, key, prio, self.now)
        self.pending[cid] = _P(self.now, self.seq, cid, key, prio)

    @precondition(lambda self: bool(self.pending))
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        cid = data.draw(st.sampled_from(sorted(self.pending)))
        assert self.s.cancel(cid)
        del self.pending[cid]
        assert not self.s.cancel(cid)

    @rule(dt=st.sampled_from([0.0, 0.5, 1.0, 3.0, 6.0]))
    def advance(self, dt: float) -> None:
        self.now += dt

    @precondition(lambda self: bool(self.running))
    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        i = data.draw(st.integers(0, len(self.running) - 1))
        _, key = self.running.pop(i)
        self.s.complete(key)

    @rule()
    def decide(self) -> None:
        free = self._free()
        before = dict(self.pending)
        running_before = {k: self._running_of(k) for k in TASKS}
        oldest = min(before.values()) if before else None
        out = self.s.decide(free, self.now)
        # budget and slots
        assert sum(d.demand.memory_mb for d in out) <= free.memory_mb
        assert sum(d.demand.cpu_milli for d in out) <= free.cpu_milli
        assert len(out) <= free.envs
        for d in out:
            p = self.pending.pop(d.call_id)  # it was pending, exactly once
            assert d.task == p.key and d.demand == TASKS[p.key][0]
            self.running.append((d.call_id, d.task))
        # per-task concurrency
        for key, (_, cap) in TASKS.items():
            assert self._running_of(key) <= cap
        dispatched = {d.call_id: before[d.call_id] for d in out}
        for p in dispatched.values():
            for q in self.pending.values():
                if q.key == p.key and q.prio == p.prio:
                    assert q.seq > p.seq, "FIFO per task at equal priority"
                if q.key == p.key and q.prio > p.prio:
                    assert self.now - p.t >= AGING, "higher priority first unless aged"
        # the aged oldest call is never passed
        if (
            oldest is not None
            and self.now - oldest.t >= AGING
            and running_before[oldest.key] < TASKS[oldest.key][1]
            and free.envs > 0
        ):
            assert oldest.call_id in dispatched or not out
        # work-conserving: what is left cannot run now, or an aged call holds the line
        left = self._free()
        if self.pending:
            o = min(self.pending.values())
            od, ocap = TASKS[o.key]
            barrier = (
                self.now - o.t >= AGING
                and self._running_of(o.key) < ocap
                and (od.memory_mb > left.memory_mb or od.cpu_milli > left.cpu_milli)
            )
            if not barrier and left.envs > 0:
                for q in self.pending.values():
                    dq, capq = TASKS[q.key]
                    assert (
                        self._running_of(q.key) >= capq
                        or dq.memory_mb > left.memory_mb
                        or dq.cpu_milli > left.cpu_milli
                    ), f"{q.call_id} could run but was left waiting"

    @invariant()
    def counts_agree(self) -> None:
        assert self.s.pending_count == len(self.pending)
        for key in TASKS:
            assert self.s.running(key) == self._running_of(key)


TestSchedulerMachine = SchedulerMachine.TestCase
TestSchedulerMachine.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)


@settings(max_examples=60, deadline=None)
@given(
    arrivals=st.lists(
        st.tuples(
            st.floats(0, 20, allow_nan=False),
            st.sampled_from(sorted(TASKS)),
            st.sampled_from([0, 5]),
            st.floats(0.1, 2.0, allow_nan=False),
        ),
        min_size=1,
        max_size=40,
    )
)
def test_simulation_everything_runs_and_aged_calls_wait_bounded(
    arrivals: list[tuple[float, str, int, float]],
) -> None:
    """Event-driven simulation: every call runs; the oldest aged call goes within one
    maximum run time (all running calls end by then, and nothing new passes it)."""
    s = Scheduler(CAP, aging_s=AGING, queue_bound=10_000)
    for key, (demand, cap) in TASKS.items():
        s.set_task(key, demand, cap)
    arrivals = sorted(arrivals, key=lambda a: a[0])
    max_run = max(a[3] for a in arrivals)
    info = {f"c{i}": a for i, a in enumerate(arrivals)}
    events: list[tuple[float, int, str, str]] = []  # (t, kind 0=end 1=arrive, call, key)
    for i, (t, key, _, _) in enumerate(arrivals):
        heapq.heappush(events, (t, 1, f"c{i}", key))
    mem = cpu = envs = 0
    started: dict[str, float] = {}
    aged_oldest_since: dict[str, float] = {}
    pending: dict[str, tuple[float, int]] = {}
    n = 0
    while events:
        t = events[0][0]
        while events and events[0][0] == t:
            _, kind, cid, key = heapq.heappop(events)
            if kind == 2:  # a wake-up at an aging moment
                continue
            d = TASKS[key][0]
            if kind == 0:
                mem, cpu, envs = mem - d.memory_mb, cpu - d.cpu_milli, envs - 1
                s.complete(key)
            else:
                n += 1
                s.enqueue(cid, key, info[cid][2], t)
                pending[cid] = (t, n)
        if pending:
            ocid = min(pending, key=lambda c: pending[c])
            if t - pending[ocid][0] >= AGING:
                aged_oldest_since.setdefault(ocid, t)
        for dsp in s.decide(
            Resources(CAP.memory_mb - mem, CAP.cpu_milli - cpu, CAP.envs - envs), t
        ):
            mem += dsp.demand.memory_mb
            cpu += dsp.demand.cpu_milli
            envs += 1
            started[dsp.call_id] = t
            del pending[dsp.call_id]
            heapq.heappush(events, (t + info[dsp.call_id][3], 0, dsp.call_id, dsp.task))
        # time passing alone can age a call: look again at the aging moment
        if pending and not events:
            raise AssertionError(f"calls left waiting with nothing running: {sorted(pending)}")
        if pending:
            ocid = min(pending, key=lambda c: pending[c])
            wake = pending[ocid][0] + AGING
            if wake > t and (not events or wake < events[0][0]):
                heapq.heappush(events, (wake, 2, "", ""))
    assert set(started) == set(info)
    for cid, since in aged_oldest_since.items():
        assert started[cid] <= since + max_run + 1e-9, (cid, since, started[cid])

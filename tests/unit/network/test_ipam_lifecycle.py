"""The address-record state machine as data: every (state, event) pair is decided."""

from __future__ import annotations

import itertools

import pytest

from edgevisor.errors import Conflict
from edgevisor.network.lifecycle import TRANSITIONS, Event, State, next_state


@pytest.mark.parametrize(
    ("state", "event"), list(itertools.product([None, *State], list(Event)))
)
def test_every_pair_is_a_transition_or_a_conflict_naming_the_state(
    state: State | None, event: Event
) -> None:
    if (state, event) in TRANSITIONS:
        assert next_state(state, event) == TRANSITIONS[(state, event)]
        return
    with pytest.raises(Conflict) as err:
        next_state(state, event, what="address 10.0.0.2")
    assert event.value in err.value.message and "address 10.0.0.2" in err.value.message
    assert (state.value if state else "does not exist") in err.value.message


def test_the_lifecycle_of_the_design() -> None:
    path = [Event.ALLOCATE, Event.BIND, Event.MOVE, Event.PRESERVE, Event.CLAIM,
            Event.RELEASE, Event.EXPIRE]
    state: State | None = None
    seen = []
    for ev in path:
        state = next_state(state, ev)
        seen.append(state)
    assert seen == [State.ALLOCATED, State.BOUND, State.BOUND, State.PRESERVED, State.BOUND,
                    State.HELD, State.RELEASED]


def test_released_is_final_and_only_bound_records_move_or_leak() -> None:
    assert not [k for k in TRANSITIONS if k[0] is State.RELEASED]
    assert {k[0] for k in TRANSITIONS if k[1] in (Event.MOVE, Event.LEAK)} == {State.BOUND}
    with pytest.raises(Conflict, match="already released"):
        next_state(State.HELD, Event.RELEASE)

"""The address-record state machine, as data. Pure; the store applies it in records.py.

Theory of operation
-------------------
A network address record pairs a logical address (owned by an account, inside one of its
networks) with, while an instance runs, a physical address and the one host that
translates for it::

      allocate            bind / claim            preserve
    ∅ ───────▶ allocated ─────────────▶ bound ────────────▶ preserved
                   │   ▲ move (new host,   │  ▲                 │
                   │   └── same state) ────┘  └─── claim ───────┘
                   │                       │                    │
                   └──── release ──────────┴──── release ───────┘
                                 │  (also leak collection, from bound)
                                 ▼
                               held ──── expire (hold-down over) ───▶ released (∅)

- *allocated*: the logical address is the account's, no instance, no physical address.
- *bound*: an instance on exactly one host uses it; it has a physical address from the
  host group's pool. *move* (the migration hook) changes host and physical address and
  keeps the state: the record names one host at any time (fencing).
- *preserved*: the instance stopped; the account keeps the logical address, the physical
  address goes back to its pool. *claim* binds it to another instance of the same account.
- *held*: released, waiting out the hold-down so peers stop using it; not reusable.
- *released*: the record is gone and the address is back in the free pool; only the
  history remains. Deleting the account ends a hold early (*account_deleted*): with the
  account's instances gone nobody can still be using the address, and its network goes
  with the account.

Every transition increments the record's generation (compare-and-set) and appends exactly
one history row in the same transaction.
"""

from __future__ import annotations

import enum

from edgevisor.errors import Conflict

__all__ = ["TRANSITIONS", "Event", "State", "next_state"]


class State(enum.StrEnum):
    ALLOCATED = "allocated"
    BOUND = "bound"
    PRESERVED = "preserved"
    HELD = "held"
    RELEASED = "released"


class Event(enum.StrEnum):
    ALLOCATE = "allocate"
    BIND = "bind"
    PRESERVE = "preserve"
    CLAIM = "claim"
    MOVE = "move"
    RELEASE = "release"
    LEAK = "leak_collected"
    EXPIRE = "expire"
    ACCOUNT_DELETED = "account_deleted"


#: (from_state or None for a new record, event) -> to_state. Anything else is refused.
TRANSITIONS: dict[tuple[State | None, Event], State] = {
    (None, Event.ALLOCATE): State.ALLOCATED,
    (State.ALLOCATED, Event.BIND): State.BOUND,
    (State.BOUND, Event.PRESERVE): State.PRESERVED,
    (State.PRESERVED, Event.CLAIM): State.BOUND,
    (State.BOUND, Event.MOVE): State.BOUND,
    (State.ALLOCATED, Event.RELEASE): State.HELD,
    (State.BOUND, Event.RELEASE): State.HELD,
    (State.PRESERVED, Event.RELEASE): State.HELD,
    (State.BOUND, Event.LEAK): State.HELD,
    (State.HELD, Event.EXPIRE): State.RELEASED,
    (State.HELD, Event.ACCOUNT_DELETED): State.RELEASED,
}

_HINTS: dict[tuple[State, Event], str] = {
    (State.HELD, Event.RELEASE): "it is already released (held until its hold-down ends)",
    (State.BOUND, Event.BIND): "it is already bound to an instance",
    (State.BOUND, Event.CLAIM): "it is bound to a running instance; only preserved "
    "addresses can be claimed",
    (State.ALLOCATED, Event.CLAIM): "it is not preserved; bind it instead",
    (State.ALLOCATED, Event.PRESERVE): "it is not bound to an instance",
    (State.PRESERVED, Event.PRESERVE): "it is already preserved",
    (State.PRESERVED, Event.BIND): "it is preserved; claim it instead",
}


def next_state(state: State | None, event: Event, *, what: str = "address") -> State:
    """The state after ``event``; Conflict naming the current state and the reason if not."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        pass
    if state is None:
        raise Conflict(f"cannot {event.value} {what}: it does not exist")
    hint = _HINTS.get((state, event), f"not allowed in state {state.value}")
    raise Conflict(f"cannot {event.value} {what} (state {state.value}): {hint}")

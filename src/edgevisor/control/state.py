"""What every request handler of the controller shares: settings, store, clock, events."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edgevisor.control.links import AgentLinks
from edgevisor.settings import Settings
from edgevisor.store import repos
from edgevisor.store.engine import Store

Clock = Callable[[], float]


@dataclass
class ControllerState:
    settings: Settings
    store: Store
    clock: Clock = field(default=time.time)
    links: AgentLinks = field(init=False)

    def __post_init__(self) -> None:
        self.links = AgentLinks(self.store)

    def publish(
        self,
        kind: str,
        *,
        subject: str = "",
        account_id: int | None = None,
        data: dict[str, Any] | None = None,
    ) -> None:
        """Append an event in its own transaction (SSE readers poll the log)."""
        with self.store.session() as s:
            repos.add_event(
                s, kind, self.clock(), subject=subject, account_id=account_id, data=data
            )

"""Operations an agent performs for the controller, by name.

Each capability registers its operations (``tasks.deploy``, ``volumes.create``,
``records.apply`` ...) on the agent's :class:`OpRouter`. The controller reaches them through
:mod:`edgevisor.control.links`: in-process for ``edgevisor up``, over the agent's HTTP API
(authenticated with the per-host agent key) for a fleet. Payloads and results are JSON.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from edgevisor.errors import NotFound, RequestError

OpHandler = Callable[[dict[str, Any]], Awaitable[Any]]


class OpRouter:
    def __init__(self) -> None:
        self._ops: dict[str, OpHandler] = {}

    def add(self, name: str, handler: OpHandler) -> None:
        if name in self._ops:
            raise ValueError(f"operation {name!r} registered twice")
        self._ops[name] = handler

    def op(self, name: str) -> Callable[[OpHandler], OpHandler]:
        def deco(fn: OpHandler) -> OpHandler:
            self.add(name, fn)
            return fn

        return deco

    @property
    def names(self) -> list[str]:
        return sorted(self._ops)

    async def dispatch(self, name: str, payload: Any) -> Any:
        handler = self._ops.get(name)
        if handler is None:
            raise NotFound(f"agent has no operation {name!r}")
        if not isinstance(payload, dict):
            raise RequestError(f"operation {name!r} takes a JSON object")
        return await handler(payload)

"""How the controller reaches agents: in-process (``edgevisor up``) or over HTTP.

Either way a call is ``await links.call(host, op, payload)`` and returns the op's JSON
result or raises the typed error the agent raised. An agent that does not answer is a
:class:`~edgevisor.errors.PeerUnavailable`, never a hang: every call has a timeout.
"""

from __future__ import annotations

from typing import Any

import httpx
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from edgevisor.agent.rpc import OpRouter
from edgevisor.errors import PeerUnavailable, from_payload
from edgevisor.store import repos
from edgevisor.store.engine import Store


class AgentLinks:
    def __init__(self, store: Store, *, timeout_s: float = 30.0) -> None:
        self.store = store
        self.timeout_s = timeout_s
        self._local: dict[str, OpRouter] = {}
        self._http = httpx.AsyncClient(timeout=timeout_s)

    def attach_local(self, host: str, router: OpRouter) -> None:
        """Route calls for ``host`` straight to an agent in this process."""
        self._local[host] = router

    def detach_local(self, host: str) -> None:
        self._local.pop(host, None)

    async def aclose(self) -> None:
        await self._http.aclose()

    def is_local(self, host: str) -> bool:
        return host in self._local

    @staticmethod
    def endpoint_in(s: Session, host: str) -> tuple[str, str]:
        """``(agent url, agent key)`` of an up host, read in the caller's session.

        Callers that already hold a store transaction resolve their targets here and pass
        ``endpoint=`` to :meth:`call`, saving a store round trip (and a thread hop) per call.
        """
        h = repos.get_host(s, host)
        if not h.agent_url or not h.agent_key:
            raise PeerUnavailable(f"host {host!r} has not reported an agent address yet")
        if h.state != "up":
            raise PeerUnavailable(f"host {host!r} is down")
        return h.agent_url, h.agent_key

    def _endpoint(self, host: str) -> tuple[str, str]:
        with self.store.session() as s:
            return self.endpoint_in(s, host)

    async def call(
        self, host: str, op: str, payload: dict[str, Any], *, timeout_s: float | None = None,
        endpoint: tuple[str, str] | None = None,
    ) -> Any:
        """Call ``op`` on ``host``; ``endpoint`` as resolved by :meth:`endpoint_in`, if any."""
        local = self._local.get(host)
        if local is not None:
            return await local.dispatch(op, payload)
        if endpoint is None:
            endpoint = await run_in_threadpool(self._endpoint, host)
        url, key = endpoint
        try:
            resp = await self._http.post(
                f"{url}/agent/v1/ops/{op}",
                json=payload,
                headers={"authorization": f"Bearer {key}"},
                timeout=timeout_s or self.timeout_s,
            )
        except httpx.TransportError as exc:
            raise PeerUnavailable(f"agent on host {host!r} is unreachable: {exc}") from exc
        body: Any
        try:
            body = resp.json()
        except ValueError:
            body = resp.text
        if resp.status_code >= 400:
            raise from_payload(resp.status_code, body)
        return body.get("result") if isinstance(body, dict) else None

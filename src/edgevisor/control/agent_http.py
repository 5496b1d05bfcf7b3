"""Records pushes to agents over aiohttp: the transport of the remap hot path.

:class:`~edgevisor.control.links.AgentLinks` calls agents with httpx. A push is on the
critical path of every move twice (old host, then new host), and measured here against
the agent's own server, an httpx ``AsyncClient`` round trip of a ``records.apply`` costs
4-5 ms more than aiohttp's under the shared load of this VM (httpx/h11 parse in Python;
aiohttp's parser is C). :class:`AgentHttp` makes the same call with the same contract:
the op's JSON ``result``, the agent's typed error re-raised, and
:class:`~edgevisor.errors.PeerUnavailable` for an agent that cannot be reached or does
not answer in time.

One ``ClientSession`` per event loop (a session belongs to the loop it was made in),
with kept-alive connections. Its keep-alive is shorter than the agent's server (uvicorn
closes idle connections after 5 s), and a request on a kept-alive connection that the
server closed meanwhile is sent again once on a new connection: ``records.apply`` is
idempotent (generations only grow), and a spurious "unreachable" would count as the
old host's answer in a fenced move.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp

from edgevisor.errors import PeerUnavailable, from_payload

__all__ = ["AgentHttp"]

#: Idle connections are closed after this (the agent's uvicorn closes them after 5 s).
KEEPALIVE_S = 4.0


class AgentHttp:
    """Agent operations over HTTP with aiohttp (see the module doc)."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _current(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._session is None or self._loop is not loop or self._session.closed:
            # A session of another loop cannot be used (nor closed) from this one.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(keepalive_timeout=KEEPALIVE_S),
                json_serialize=json.dumps,
            )
            self._loop = loop
        return self._session

    async def aclose(self) -> None:
        """Close the session of the running loop (if it is this loop's)."""
        session, self._session = self._session, None
        if session is not None and self._loop is asyncio.get_running_loop():
            await session.close()

    async def call(
        self,
        host: str,
        op: str,
        payload: dict[str, Any],
        *,
        endpoint: tuple[str, str],
        timeout_s: float,
    ) -> Any:
        """Call ``op`` on ``host`` at ``endpoint`` = ``(agent url, agent key)``."""
        url, key = endpoint
        session = self._current()
        data = json.dumps(payload).encode()
        headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        for attempt in (1, 2):
            try:
                async with session.post(
                    f"{url}/agent/v1/ops/{op}", data=data, headers=headers, timeout=timeout
                ) as resp:
                    status = resp.status
                    raw = await resp.read()
                break
            except aiohttp.ServerDisconnectedError as exc:
                if attempt == 1:
                    continue  # a kept-alive connection the agent closed meanwhile
                raise PeerUnavailable(f"agent on host {host!r} is unreachable: {exc}") from exc
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                raise PeerUnavailable(
                    f"agent on host {host!r} is unreachable: {type(exc).__name__}: {exc}"
                ) from exc
        body: Any
        try:
            body = json.loads(raw)
        except ValueError:
            body = raw.decode(errors="replace")
        if status >= 400:
            raise from_payload(status, body)
        return body.get("result") if isinstance(body, dict) else None

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

The records ops (``CHANNEL_OPS``) go over the agent's push channel when it is open
(:mod:`.agent_channel`: one WebSocket per agent, no HTTP request per call), and over
HTTP otherwise, or when the channel broke while the call was in flight; the first call
to a host starts the channel's connect in the background. Same contract either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import aiohttp

from edgevisor.agent.channel_frames import CHANNEL_OPS
from edgevisor.control.agent_channel import AgentChannel, ChannelDown
from edgevisor.errors import PeerUnavailable, from_payload

__all__ = ["AgentHttp"]

#: Idle connections are closed after this (the agent's uvicorn closes them after 5 s).
KEEPALIVE_S = 4.0
_CLOSING: set[asyncio.Task[None]] = set()  # strong references to channels being closed


class AgentHttp:
    """Agent operations over HTTP with aiohttp (see the module doc)."""

    def __init__(self, *, channels: bool = True) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._use_channels = channels
        self._channels: dict[str, AgentChannel] = {}  # host -> its channel (this loop's)

    def _current(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._session is None or self._loop is not loop or self._session.closed:
            # A session of another loop cannot be used (nor closed) from this one; nor
            # can its channels.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(keepalive_timeout=KEEPALIVE_S),
                json_serialize=json.dumps,
            )
            self._loop = loop
            self._channels = {}
        return self._session

    def channel(self, host: str, endpoint: tuple[str, str]) -> AgentChannel | None:
        """``host``'s push channel at ``endpoint`` (made, not yet connected, on first
        use; a new one when the agent's address or key changed); None if disabled."""
        if not self._use_channels:
            return None
        session = self._current()
        url, key = endpoint
        ch = self._channels.get(host)
        if ch is None or ch.url != url or ch.key != key:
            if ch is not None:
                task = asyncio.get_running_loop().create_task(ch.aclose())
                _CLOSING.add(task)
                task.add_done_callback(_CLOSING.discard)
            ch = self._channels[host] = AgentChannel(session, host, url, key)
        return ch

    def channel_open(self, host: str, endpoint: tuple[str, str]) -> bool:
        """Whether ``host``'s channel is open now (else: start its connect)."""
        ch = self.channel(host, endpoint)
        if ch is None:
            return False
        if not ch.open:
            ch.ensure()
        return ch.open

    async def aclose(self) -> None:
        """Close the session and channels of the running loop (if they are this loop's)."""
        session, self._session = self._session, None
        channels, self._channels = self._channels, {}
        if session is not None and self._loop is asyncio.get_running_loop():
            for ch in channels.values():
                await ch.aclose()
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
        if op in CHANNEL_OPS:
            ch = self.channel(host, endpoint)
            if ch is not None:
                if ch.open:
                    with contextlib.suppress(ChannelDown):  # then: over HTTP
                        return await ch.call(op, payload, timeout_s)
                ch.ensure()
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

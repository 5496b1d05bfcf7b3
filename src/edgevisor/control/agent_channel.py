"""The controller's end of an agent push channel (one WebSocket per agent).

Theory of operation
-------------------
An HTTP call to an agent costs a request's parse, routing and response on both sides
every time; the records ops of the remap hot path (two pushes per move) go instead over
one long-lived WebSocket per agent (frames: :mod:`edgevisor.agent.channel_frames`),
authenticated once with the agent key in the upgrade.

States: ``down`` -> ``connecting`` -> ``open`` -> ``down`` (the agent closed, restarted,
or a frame could not be read). A call never waits for a connect: when the channel is
not open, :meth:`AgentChannel.call` raises :class:`ChannelDown` at once and the caller
(:class:`~edgevisor.control.agent_http.AgentHttp`) makes the call over HTTP, while
:meth:`AgentChannel.ensure` starts a connect in the background (after a failed one,
not before a back-off of :data:`RETRY_MIN_S` doubling up to :data:`RETRY_MAX_S`).

One reader task per channel resolves the pending calls by id. When the connection ends,
every call still pending fails with :class:`ChannelDown`; the caller sends it again over
HTTP (the channel's ops are idempotent: see ``CHANNEL_OPS``), so a broken channel costs
time, never a spurious "unreachable" (which in a fenced move would count as the old
host's answer). A call that gets no answer within its timeout is
:class:`~edgevisor.errors.PeerUnavailable`, as over HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from typing import Any

import aiohttp

from edgevisor.agent.channel_frames import (
    CHANNEL_PATH,
    MAX_FRAME_CHARS,
    FrameError,
    decode_reply,
    encode_request,
)
from edgevisor.errors import PeerUnavailable

__all__ = ["RETRY_MAX_S", "RETRY_MIN_S", "AgentChannel", "ChannelDown"]

log = logging.getLogger(__name__)

#: Back-off between failed connects (doubling).
RETRY_MIN_S = 0.5
RETRY_MAX_S = 30.0
#: WebSocket pings; a channel whose pong does not come back is closed (then: HTTP).
HEARTBEAT_S = 15.0


class ChannelDown(Exception):
    """The channel is not open, or closed while the call was pending (send it over HTTP)."""


class AgentChannel:
    """One agent's push channel (see the module doc). Belongs to one event loop."""

    def __init__(self, session: aiohttp.ClientSession, host: str, url: str, key: str) -> None:
        self.host, self.url, self.key = host, url, key
        self._session = session
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._ids = itertools.count(1)
        self._connecting: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._retry_at = 0.0
        self._delay = RETRY_MIN_S
        self._closed = False
        self.connects = 0  # connections opened so far (tests, diagnostics)
        self.last_error: str | None = None

    @property
    def open(self) -> bool:
        return self._ws is not None and not self._ws.closed

    def ensure(self) -> None:
        """Start a connect in the background if the channel is down and not backing off."""
        if self._closed or self.open:
            return
        if self._connecting is not None and not self._connecting.done():
            return
        if time.monotonic() < self._retry_at:
            return
        self._connecting = asyncio.get_running_loop().create_task(self._connect())

    async def wait_open(self, timeout_s: float) -> bool:
        """Connect now if needed and wait for it (tests, warm-up); whether it is open."""
        self._retry_at = 0.0
        self.ensure()
        task = self._connecting
        if task is not None and not task.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(task), timeout_s)
        return self.open

    async def _connect(self) -> None:
        try:
            ws = await self._session.ws_connect(
                self.url.rstrip("/") + CHANNEL_PATH,
                headers={"authorization": f"Bearer {self.key}"},
                heartbeat=HEARTBEAT_S,
                timeout=aiohttp.ClientWSTimeout(ws_close=5.0),
                max_msg_size=0,  # records.apply answers of a full set can be large
                # No permessage-deflate: frames are small, and compressing each one
                # costs both ends CPU on the hot path.
                compress=0,
            )
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"
            self._retry_at = time.monotonic() + self._delay
            self._delay = min(RETRY_MAX_S, self._delay * 2)
            log.debug("push channel to %s not opened: %s", self.host, self.last_error)
            return
        if self._closed:
            await ws.close()
            return
        self._ws = ws
        self._delay = RETRY_MIN_S
        self.connects += 1
        self._reader = asyncio.get_running_loop().create_task(self._read(ws))

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        why = "the agent closed the channel"
        try:
            async for msg in ws:
                if msg.type not in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                    break
                try:
                    reply = decode_reply(msg.data)
                except FrameError as exc:
                    why = f"unreadable frame from the agent: {exc}"
                    break
                fut = self._pending.pop(reply.id, None)
                if fut is None or fut.done():
                    continue  # its caller timed out
                if reply.error is not None:
                    fut.set_exception(reply.error)
                else:
                    fut.set_result(reply.result)
        except Exception as exc:  # any failure ends this channel only
            why = f"{type(exc).__name__}: {exc}"
        finally:
            if self._ws is ws:
                self._ws = None
            self.last_error = why
            self._fail_pending(why)
            with contextlib.suppress(Exception):
                await ws.close()

    def _fail_pending(self, why: str) -> None:
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(ChannelDown(why))

    async def call(self, op: str, payload: Any, timeout_s: float) -> Any:
        """The op's result; its typed error; :class:`ChannelDown` (send it over HTTP);
        :class:`~edgevisor.errors.PeerUnavailable` when no answer comes in time."""
        ws = self._ws
        if ws is None or ws.closed:
            raise ChannelDown(self.last_error or "not open")
        rid = next(self._ids)
        text = encode_request(rid, op, payload)
        if len(text) > MAX_FRAME_CHARS:
            raise ChannelDown("too large for the channel")  # a full set: over HTTP
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            await ws.send_str(text)
        except (aiohttp.ClientError, OSError, RuntimeError) as exc:
            self._pending.pop(rid, None)
            raise ChannelDown(f"{type(exc).__name__}: {exc}") from exc
        # A timer rather than wait_for: no extra task or future per call.
        timer = asyncio.get_running_loop().call_later(timeout_s, self._expire, fut, timeout_s)
        try:
            return await fut
        finally:
            timer.cancel()
            self._pending.pop(rid, None)

    def _expire(self, fut: asyncio.Future[Any], timeout_s: float) -> None:
        if not fut.done():
            fut.set_exception(
                PeerUnavailable(
                    f"agent on host {self.host!r} is unreachable: no answer in {timeout_s:g} s"
                )
            )

    async def aclose(self) -> None:
        """Close for good (the controller stops); pending calls fail with ChannelDown."""
        self._closed = True
        if self._connecting is not None and not self._connecting.done():
            self._connecting.cancel()
            with contextlib.suppress(BaseException):
                await self._connecting
        ws, self._ws = self._ws, None
        if ws is not None:
            with contextlib.suppress(Exception):
                await ws.close()
        if self._reader is not None:
            with contextlib.suppress(BaseException):
                await self._reader
        self._fail_pending("the channel was closed")

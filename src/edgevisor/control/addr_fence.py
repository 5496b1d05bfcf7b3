"""Prepare/commit for the hosts after a fence: their work off the move's critical path.

In a fenced push (:func:`edgevisor.control.addr_sync.push`) the host giving a record up
(``Push.first``) is pushed alone, and the others only after it acknowledged. With this
module, while the first host applies, each other host whose push channel is open gets a
``records.prepare`` of its very body (it stages the delta and touches nothing in the
kernel: it translates nothing yet, so fencing holds); after the first host's answer, a
tiny ``records.commit`` makes it apply. The rules of the fence are unchanged: a commit
is sent only after the first host answered (or was found unreachable, exactly as
before), and what a host applies is decided at its commit.

Fallbacks, each to the plain ``records.apply`` as before: a host whose channel is not
open (no prepare then: the channel is the fast path, and a prepare over HTTP would only
add load); a prepare that failed; a commit refused as ``not_prepared`` (expired, or the
agent restarted in between). A prepare never committed expires on the agent.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

from edgevisor.agent.channel_frames import NotPrepared
from edgevisor.errors import EdgevisorError, PeerUnavailable

if TYPE_CHECKING:
    from edgevisor.control.addr_sync import Push
    from edgevisor.control.agent_http import AgentHttp

__all__ = ["Prepares", "prepare_targets", "token_for"]

log = logging.getLogger(__name__)


def prepare_targets(
    rest: Iterable[str],
    endpoints: dict[str, tuple[str, str] | str],
    bodies: dict[str, dict[str, Any]],
    channel_open: Callable[[str, tuple[str, str]], bool],
) -> list[str]:
    """The hosts after the fence that get a prepare: those with a resolved agent
    endpoint, a body made in the change's transaction, and an open channel."""
    out: list[str] = []
    for host in rest:
        ep = endpoints.get(host)
        if isinstance(ep, tuple) and host in bodies and channel_open(host, ep):
            out.append(host)
    return out


def token_for(record_id: int, generation: int) -> str:
    """A prepare's token: the record's id and generation (for logs) and a random part."""
    return f"{record_id}.{generation}.{secrets.token_hex(6)}"


class Prepares:
    """The prepares of one fenced push, sent at once; each host's commit later."""

    def __init__(
        self, fast: AgentHttp, change: Push, hosts: list[str], *, timeout_s: float
    ) -> None:
        self._fast = fast
        self._change = change
        self._timeout_s = timeout_s
        self.tokens: dict[str, str] = {}
        self._sent: dict[str, asyncio.Task[bool]] = {}
        rec = change.record
        loop = asyncio.get_running_loop()
        for host in hosts:
            token = token_for(rec.id, rec.generation)
            self.tokens[host] = token
            self._sent[host] = loop.create_task(self._prepare(host, token))

    def __contains__(self, host: object) -> bool:
        return host in self._sent

    async def _prepare(self, host: str, token: str) -> bool:
        endpoint = self._change.endpoints[host]
        assert isinstance(endpoint, tuple)
        body = {**self._change.bodies[host], "token": token}
        try:
            await self._fast.call(
                host, "records.prepare", body, endpoint=endpoint, timeout_s=self._timeout_s
            )
        except EdgevisorError as exc:
            log.debug("prepare on %s failed (full apply follows): %s", host, exc.message)
            return False
        return True

    async def commit(
        self,
        host: str,
        reports: list[tuple[str, Any]],
        apply: Callable[[], Awaitable[str]],
        outcome: Callable[[Any], str],
    ) -> str:
        """``host``'s commit (after the fence): "ok" or the error, as ``push_host`` says
        it; what the host reports is appended to ``reports``. ``apply`` is the plain
        push, for a prepare that failed or a commit refused as not prepared."""
        if not await self._sent[host]:
            return await apply()
        endpoint = self._change.endpoints[host]
        assert isinstance(endpoint, tuple)
        try:
            result = await self._fast.call(
                host,
                "records.commit",
                {"token": self.tokens[host]},
                endpoint=endpoint,
                timeout_s=self._timeout_s,
            )
        except NotPrepared:
            return await apply()
        except PeerUnavailable as exc:
            log.debug("records for %s not pushed: %s", host, exc.message)
            return exc.message
        except EdgevisorError as exc:
            log.warning("host %s refused records: %s", host, exc.message)
            return exc.message
        reports.append((host, result))
        return outcome(result)

    async def cancel(self) -> None:
        """Stop prepares not answered yet (their staged deltas expire on the agents)."""
        for task in self._sent.values():
            task.cancel()
        await asyncio.gather(*self._sent.values(), return_exceptions=True)

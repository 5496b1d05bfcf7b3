"""The agent push channel (control.agent_channel over agent.server) against real apps.

Calls go over the channel once it is open (no HTTP request reaches the agent then) with
the HTTP contract: the op's result, the agent's typed error, PeerUnavailable for no
answer in time. Without the key the upgrade is refused. A channel that is down (agent
restarted, or an agent without WebSocket support) costs no call: it goes over HTTP, and
the channel comes back after the agent does.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from edgevisor.agent.channel_frames import NotPrepared
from edgevisor.agent.rpc import OpRouter
from edgevisor.control.agent_http import AgentHttp
from edgevisor.errors import Conflict, NotFound, PeerUnavailable, Unauthorized
from edgevisor.testing.controller import free_port

KEY = "agent-key"


def _router(seen: list[str] | None = None) -> OpRouter:
    router = OpRouter()

    async def apply(payload: dict[str, Any]) -> Any:
        if seen is not None:
            seen.append(str(payload.get("tag")))
        return {"reports": [], "error": None, "tag": payload.get("tag")}

    async def refuse(_payload: dict[str, Any]) -> Any:
        raise Conflict("generation 3 is behind 4")

    async def commit(_payload: dict[str, Any]) -> Any:
        raise NotPrepared("no prepared update 'x'")

    async def slow(payload: dict[str, Any]) -> Any:
        await asyncio.sleep(float(payload.get("s", 1.5)))
        return {"slept": True}

    router.add("records.apply", apply)
    router.add("records.state", refuse)
    router.add("records.commit", commit)
    router.add("records.prepare", slow)
    return router


async def _until(pred: Any, timeout_s: float = 20.0) -> None:
    end = asyncio.get_running_loop().time() + timeout_s
    while not pred():
        assert asyncio.get_running_loop().time() < end, "condition not reached in time"
        await asyncio.sleep(0.02)


async def test_calls_go_over_the_open_channel_with_the_http_contract(serve: Any) -> None:
    counts: list[Any] = []
    seen: list[str] = []
    async with serve(_router(seen), KEY, counter=counts) as url:
        http = AgentHttp()
        ep = (url, KEY)
        try:
            ch = http.channel("h1", ep)
            assert ch is not None
            assert await ch.wait_open(10), ch.last_error
            before = counts[0].http
            # Multiplexed: a slow call in flight does not hold up the others.
            slow = asyncio.create_task(
                http.call("h1", "records.prepare", {"s": 0.5}, endpoint=ep, timeout_s=10)
            )
            got = await asyncio.gather(
                *(
                    http.call("h1", "records.apply", {"tag": i}, endpoint=ep, timeout_s=10)
                    for i in range(20)
                )
            )
            assert [g["tag"] for g in got] == list(range(20))
            assert not slow.done()
            assert await slow == {"slept": True}
            with pytest.raises(Conflict, match="generation 3 is behind 4"):
                await http.call("h1", "records.state", {}, endpoint=ep, timeout_s=10)
            with pytest.raises(NotPrepared):
                await http.call("h1", "records.commit", {}, endpoint=ep, timeout_s=10)
            with pytest.raises(PeerUnavailable, match="host 'h1' is unreachable"):
                await http.call("h1", "records.prepare", {"s": 2}, endpoint=ep, timeout_s=0.3)
            assert counts[0].http == before, "a call went over HTTP"
            assert sorted(seen, key=int) == [str(i) for i in range(20)]
            # Not a records op: HTTP, same errors (the agent has no such op).
            with pytest.raises(NotFound):
                await http.call("h1", "tasks.deploy", {}, endpoint=ep, timeout_s=10)
            assert counts[0].http == before + 1
            assert ch.connects == 1
        finally:
            await http.aclose()


async def test_channel_without_the_key_is_refused(serve: Any) -> None:
    counts: list[Any] = []
    async with serve(_router(), KEY, counter=counts) as url:
        http = AgentHttp()
        try:
            ch = http.channel("h1", (url, "wrong"))
            assert ch is not None
            assert not await ch.wait_open(10)
            assert "403" in str(ch.last_error)
            # The call itself goes over HTTP and is refused there, with the same error.
            with pytest.raises(Unauthorized):
                await http.call("h1", "records.apply", {}, endpoint=(url, "wrong"), timeout_s=10)
            # A raw upgrade without any authorization header is refused too.
            session = http._current()
            with pytest.raises(Exception, match="403"):
                await session.ws_connect(url + "/agent/v1/channel")
        finally:
            await http.aclose()


async def test_agent_restart_falls_back_to_http_then_reconnects(serve: Any) -> None:
    port = free_port()
    counts: list[Any] = []
    http = AgentHttp()
    try:
        async with serve(_router(), KEY, port=port, counter=counts) as url:
            ep = (url, KEY)
            ch = http.channel("h1", ep)
            assert ch is not None and await ch.wait_open(10)
        # The agent is gone: the channel notices; a call is PeerUnavailable (HTTP's).
        await _until(lambda: not ch.open)
        with pytest.raises(PeerUnavailable):
            await http.call("h1", "records.apply", {"tag": 1}, endpoint=ep, timeout_s=5)
        async with serve(_router(), KEY, port=port, counter=counts) as url2:
            assert url2 == url
            # The first call after the restart goes over HTTP and succeeds; the channel
            # reconnects in the background (after its back-off) and carries the next ones.
            got = await http.call("h1", "records.apply", {"tag": 2}, endpoint=ep, timeout_s=10)
            assert got["tag"] == 2
            assert counts[1].http >= 1

            async def reopened() -> bool:
                await http.call("h1", "records.apply", {"tag": 3}, endpoint=ep, timeout_s=10)
                return ch.open

            end = asyncio.get_running_loop().time() + 30
            while not await reopened():
                assert asyncio.get_running_loop().time() < end, ch.last_error
                await asyncio.sleep(0.1)
            assert ch.connects == 2
            before = counts[1].http
            got = await http.call("h1", "records.apply", {"tag": 4}, endpoint=ep, timeout_s=10)
            assert got["tag"] == 4
            assert counts[1].http == before
    finally:
        await http.aclose()


async def test_agent_without_websockets_is_served_over_http(serve: Any) -> None:
    counts: list[Any] = []
    async with serve(_router(), KEY, ws="none", counter=counts) as url:
        http = AgentHttp()
        ep = (url, KEY)
        try:
            ch = http.channel("h1", ep)
            assert ch is not None
            assert not await ch.wait_open(10)
            before = counts[0].http  # the refused upgrade reached the app as HTTP
            for i in range(3):
                got = await http.call("h1", "records.apply", {"tag": i}, endpoint=ep, timeout_s=10)
                assert got["tag"] == i
            assert counts[0].http >= before + 3
            assert not ch.open
        finally:
            await http.aclose()


async def test_call_in_flight_when_the_channel_breaks_is_sent_again_over_http(
    serve: Any,
) -> None:
    counts: list[Any] = []
    async with serve(_router(), KEY, counter=counts) as url:
        http = AgentHttp()
        ep = (url, KEY)
        try:
            ch = http.channel("h1", ep)
            assert ch is not None and await ch.wait_open(10)
            call = asyncio.create_task(
                http.call("h1", "records.prepare", {"s": 0.6}, endpoint=ep, timeout_s=10)
            )
            await asyncio.sleep(0.2)
            assert ch._ws is not None
            await ch._ws.close()  # the connection breaks under the pending call
            assert await call == {"slept": True}
            assert counts[0].http == 1  # the call again, over HTTP
        finally:
            await http.aclose()


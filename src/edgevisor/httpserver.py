"""Serving HTTP inside our processes: an embedded uvicorn that leaves signals to its
host process, its bound port, and a request body limit as plain ASGI middleware."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator

import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edgevisor.errors import PayloadTooLarge


class QuietServer(uvicorn.Server):
    """A uvicorn server that leaves signal handling to the process that embeds it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def bound_port(server: uvicorn.Server) -> int:
    for srv in server.servers:
        for sock in srv.sockets:
            return int(sock.getsockname()[1])
    return 0


def replay(messages: list[Message], then: Receive | None = None) -> Receive:
    """A ``receive`` that returns ``messages`` first (already read by a middleware), then
    reads on from ``then``."""
    queue = list(messages)

    async def receive() -> Message:
        if queue:
            return queue.pop(0)
        if then is not None:
            return await then()  # e.g. http.disconnect while a stream is open
        return {"type": "http.disconnect"}

    return receive


def bearer_token(header: str) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header value, or None."""
    scheme, _, secret = header.partition(" ")
    secret = secret.strip()
    return secret if scheme.lower() == "bearer" and secret else None


class BodyLimit:
    """ASGI middleware: refuse bodies over the limit with 413, by header or while reading.

    ``exceptions`` maps ``(method, path)`` to its own limit (bundle uploads are larger).
    """

    def __init__(
        self, app: ASGIApp, limit: int, exceptions: dict[tuple[str, str], int] | None = None
    ) -> None:
        self.app = app
        self.limit = limit
        self.exceptions = exceptions or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.exceptions.get((scope["method"], scope["path"]), self.limit)
        for key, value in scope.get("headers", []):
            if key == b"content-length" and value.isdigit() and int(value) > limit:
                await _reject(limit, send)
                return
        # Read the body up to the limit first and replay it: a parser downstream would turn
        # an error raised mid-stream into a 400.
        chunks: list[bytes] = []
        seen = 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                await self.app(scope, replay([msg]), send)
                return
            chunk = msg.get("body", b"")
            seen += len(chunk)
            if seen > limit:
                await _reject(limit, send)
                return
            chunks.append(chunk)
            if not msg.get("more_body", False):
                break
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, replay([body], receive), send)


async def _reject(limit: int, send: Send) -> None:
    exc = PayloadTooLarge(f"request body is over the limit of {limit} bytes")
    body = json.dumps(exc.to_payload()).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})

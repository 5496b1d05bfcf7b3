"""The event stream: ``GET /v1/events`` as Server-Sent Events.

Readers replay the append-only event log from ``Last-Event-ID`` (or ``?after=``), then
follow it. Polling the store keeps this correct with several controller processes on one
PostgreSQL; the poll interval is short and idle streams send a comment as keep-alive.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from edgevisor.control.auth import Principal, require_principal, state_of
from edgevisor.control.state import ControllerState
from edgevisor.sdk import models as m
from edgevisor.store import repos
from edgevisor.store.models import Account

router = APIRouter(prefix="/v1")
Auth = Annotated[Principal, Depends(require_principal)]
POLL_S = 0.2
KEEPALIVE_S = 15.0


def _fetch(st: ControllerState, after: int, p: Principal) -> list[m.EventRecord]:
    with st.store.session() as s:
        names = {a.id: a.name for a in s.query(Account).all()}
        return [
            m.EventRecord(
                id=e.id,
                at=e.at,
                kind=e.kind,
                subject=e.subject,
                account=names.get(e.account_id) if e.account_id is not None else None,
                data=e.data,
            )
            for e in repos.events_after(s, after, p.account_id, p.admin)
        ]


@router.get("/events/recent", response_model=list[m.EventRecord])
def recent_events(
    p: Auth, request: Request, after: Annotated[int, Query(ge=0)] = 0
) -> list[m.EventRecord]:
    return _fetch(state_of(request), after, p)


@router.get("/events", response_class=StreamingResponse)
async def stream_events(
    p: Auth,
    request: Request,
    after: Annotated[int | None, Query(ge=0)] = None,
    kind: Annotated[str | None, Query(description="Only kinds with this prefix")] = None,
) -> StreamingResponse:
    st = state_of(request)
    last = request.headers.get("last-event-id")
    if after is None:
        if last and last.isdigit():
            after = int(last)
        else:
            after = await run_in_threadpool(_last_id, st)

    async def gen() -> AsyncIterator[bytes]:
        cursor = after or 0
        idle = 0.0
        yield b": edgevisor event stream\n\n"
        while not await request.is_disconnected():
            batch = await run_in_threadpool(_fetch, st, cursor, p)
            for ev in batch:
                cursor = ev.id
                if kind and not ev.kind.startswith(kind):
                    continue
                payload = json.dumps(ev.model_dump())
                yield f"id: {ev.id}\nevent: {ev.kind}\ndata: {payload}\n\n".encode()
            if batch:
                idle = 0.0
                continue
            await asyncio.sleep(POLL_S)
            idle += POLL_S
            if idle >= KEEPALIVE_S:
                idle = 0.0
                yield b": keep-alive\n\n"

    return StreamingResponse(gen(), media_type="text/event-stream")


def _last_id(st: ControllerState) -> int:
    with st.store.session() as s:
        return repos.last_event_id(s)

"""Hosts: join with a one-time token, heartbeat with the per-host credential, list.

Hosts are fleet infrastructure, not account objects: any token may list them, only the
admin creates join tokens or removes a host.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request

from edgevisor.control.auth import Principal, require_host, require_principal, state_of
from edgevisor.control.pki import issue_host_cert
from edgevisor.errors import Forbidden
from edgevisor.sdk import models as m
from edgevisor.store import repos
from edgevisor.store.models import Host

router = APIRouter(prefix="/v1")
Auth = Annotated[Principal, Depends(require_principal)]
HostAuth = Annotated[str, Depends(require_host)]


def host_out(h: Host) -> m.Host:
    return m.Host(
        name=h.name,
        state="up" if h.state == "up" else "down",
        cpu_count=h.cpu_count,
        memory_mb=h.memory_mb,
        disk_mb=h.disk_mb,
        physical_address=h.physical_address,
        agent_version=h.agent_version,
        joined_at=h.joined_at,
        last_heartbeat_at=h.last_heartbeat_at,
        state_changed_at=h.state_changed_at,
    )


@router.post("/hosts/join-tokens", response_model=m.JoinTokenCreated, status_code=201)
def create_join_token(
    body: m.JoinTokenCreate, p: Auth, request: Request
) -> m.JoinTokenCreated:
    p.require_admin()
    st = state_of(request)
    ttl = body.ttl_s or st.settings.controller.join_token_ttl_s
    with st.store.session() as s:
        jt, secret = repos.create_join_token(s, st.clock(), ttl, body.host)
        return m.JoinTokenCreated(secret=secret, host=jt.host_name, expires_at=jt.expires_at)


@router.post("/hosts/join", response_model=m.HostJoined, status_code=201)
def join(body: m.HostJoin, request: Request) -> m.HostJoined:
    st = state_of(request)
    now = st.clock()
    with st.store.session() as s:
        repos.spend_join_token(s, body.join_token, body.name, now)
        # signed inside the transaction: a bad CSR leaves the token unspent
        cert, ca = issue_host_cert(st, body.name, body.csr_pem) if body.csr_pem else (None, None)
        host, secret = repos.register_host(
            s,
            body.name,
            now,
            body.capacity.model_dump(),
            body.physical_address,
            body.model_dump(include={"agent_url", "agent_key"}),
        )
        repos.add_event(
            s, "host.joined", now, subject=host.name, data=host_out(host).model_dump()
        )
    return m.HostJoined(name=body.name, credential=secret, host_cert_pem=cert, ca_cert_pem=ca)


@router.post("/hosts/{name}/heartbeat", response_model=m.HeartbeatAck)
def heartbeat(
    name: str, body: m.Heartbeat, host_name: HostAuth, request: Request
) -> m.HeartbeatAck:
    st = state_of(request)
    now = st.clock()
    if name != host_name:
        raise Forbidden(f"this credential belongs to host {host_name!r}, not {name!r}")
    with st.store.session() as s:
        host = repos.get_host(s, name)
        host.last_heartbeat_at = now
        repos.apply_capacity(
            host,
            body.capacity.model_dump(),
            body.physical_address,
            body.model_dump(include={"agent_url", "agent_key"}),
        )
        if body.info:
            host.info = dict(body.info)
        if host.state != "up":
            host.state = "up"
            host.state_changed_at = now
            repos.add_event(s, "host.up", now, subject=name)
        return m.HeartbeatAck(
            host=name, state="up", heartbeat_timeout_s=st.settings.controller.heartbeat_timeout_s
        )


@router.get("/hosts", response_model=list[m.Host])
def list_hosts(_p: Auth, request: Request) -> list[m.Host]:
    st = state_of(request)
    with st.store.session() as s:
        return [host_out(h) for h in repos.list_hosts(s)]


@router.get("/hosts/{name}", response_model=m.Host)
def get_host(name: str, _p: Auth, request: Request) -> m.Host:
    st = state_of(request)
    with st.store.session() as s:
        return host_out(repos.get_host(s, name))


@router.delete("/hosts/{name}", status_code=204)
def remove_host(name: str, p: Auth, request: Request) -> None:
    p.require_admin()
    st = state_of(request)
    with st.store.session() as s:
        s.delete(repos.get_host(s, name))
        repos.add_event(s, "host.removed", st.clock(), subject=name)

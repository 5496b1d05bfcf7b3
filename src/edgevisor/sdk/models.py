"""Wire models of the HTTP API, shared by the controller (responses) and the SDK (parsing).

Keeping one definition means the OpenAPI document, the server and the client cannot drift.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
HOST_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class _Request(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Health(_Model):
    status: Literal["ok"] = "ok"
    version: str


class Whoami(_Model):
    kind: Literal["admin", "account"]
    account: str | None = None
    token_id: int


class AccountCreate(_Request):
    name: str = Field(pattern=NAME_PATTERN, description="Account name, lowercase.")


class Account(_Model):
    name: str
    created_at: float


class TokenCreate(_Request):
    account: str | None = Field(
        None, description="Account the token acts for; empty for the caller's own account."
    )
    name: str = Field("default", max_length=64)


class TokenInfo(_Model):
    id: int
    name: str
    account: str | None
    admin: bool
    created_at: float
    revoked_at: float | None = None


class TokenCreated(TokenInfo):
    secret: str = Field(description="Shown once; store it now.")


class JoinTokenCreate(_Request):
    host: str | None = Field(
        None, pattern=HOST_PATTERN, description="Restrict the token to one host name."
    )
    ttl_s: float | None = Field(None, gt=0, le=30 * 86400)


class JoinTokenCreated(_Model):
    secret: str
    host: str | None
    expires_at: float


class Capacity(_Request):
    cpu_count: int = Field(ge=0)
    memory_mb: int = Field(ge=0)
    disk_mb: int = Field(ge=0)
    agent_version: str = Field("", max_length=32)


class AgentEndpoint(_Request):
    agent_url: str | None = Field(None, max_length=255, description="Agent API base URL.")
    agent_key: str | None = Field(
        None, min_length=32, max_length=128, description="Key the controller presents."
    )


class HostJoin(AgentEndpoint):
    name: str = Field(pattern=HOST_PATTERN)
    join_token: str = Field(max_length=128)
    capacity: Capacity
    physical_address: str | None = Field(None, max_length=64)
    csr_pem: str | None = Field(
        None, max_length=16384, description="PEM CSR for the host's fleet certificate."
    )


class HostJoined(_Model):
    name: str
    credential: str = Field(description="Per-host credential for heartbeats; keep it secret.")
    host_cert_pem: str | None = Field(None, description="Fleet certificate (CN = host name).")
    ca_cert_pem: str | None = Field(None, description="The fleet CA certificate.")


class Heartbeat(AgentEndpoint):
    capacity: Capacity
    physical_address: str | None = Field(None, max_length=64)
    info: dict[str, Any] = Field(default_factory=dict)


class HeartbeatAck(_Model):
    host: str
    state: Literal["up", "down"]
    heartbeat_timeout_s: float


class Host(_Model):
    name: str
    state: Literal["up", "down"]
    cpu_count: int
    memory_mb: int
    disk_mb: int
    physical_address: str | None
    agent_version: str
    joined_at: float
    last_heartbeat_at: float
    state_changed_at: float


class EventRecord(_Model):
    id: int
    at: float
    kind: str
    subject: str
    account: str | None = None
    data: dict[str, Any] = Field(default_factory=dict)


class ErrorBody(_Model):
    code: str
    message: str
    details: dict[str, Any] | None = None


class ErrorResponse(_Model):
    error: ErrorBody

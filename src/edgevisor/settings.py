"""One frozen, typed settings tree.

Sources, later ones winning: embedded defaults < TOML file < ``EDGEVISOR_*`` environment
variables < explicit overrides (CLI flags). Nested fields are addressed with ``__`` in the
environment (``EDGEVISOR_CONTROLLER__LISTEN_PORT=7451``) and with dots in overrides
(``controller.listen_port``). Validation happens once, in :func:`load_settings`; an invalid
value raises :class:`~edgevisor.errors.ConfigError` naming the field and the reason.
Every field has a description so ``edgevisor config show`` can print a reference.
"""

from __future__ import annotations

import os
import socket
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import platformdirs
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edgevisor.devices.config import DevicesSettings
from edgevisor.errors import ConfigError
from edgevisor.migration.domain_config import DomainsSettings
from edgevisor.network.config import NetworkSettings
from edgevisor.storage.config import StorageSettings
from edgevisor.tasks.coord_config import CoordinatorSettings
from edgevisor.tasks.sandbox import SandboxSettings

ENV_PREFIX = "EDGEVISOR_"


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _default_data_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/edgevisor")
    return Path(platformdirs.user_state_dir("edgevisor"))


class ControllerSettings(_Section):
    listen_host: str = Field("127.0.0.1", description="Address the HTTP API listens on.")
    listen_port: int = Field(7450, ge=0, le=65535, description="TCP port of the HTTP API.")
    store_url: str | None = Field(
        None,
        description=(
            "SQLAlchemy URL of the store. Empty: a SQLite file `controller.db` in the data dir. "
            "PostgreSQL: `postgresql+psycopg://user:pass@host:port/db`."
        ),
    )
    heartbeat_timeout_s: float = Field(
        15.0, gt=0, description="A host with no heartbeat for this long is marked down."
    )
    reconcile_interval_s: float = Field(
        1.0, gt=0, description="How often the controller re-evaluates host liveness."
    )
    body_limit_bytes: int = Field(
        1_048_576, gt=0, description="Largest accepted request body; larger ones get 413."
    )
    bundle_limit_bytes: int = Field(
        64 * 1024 * 1024, gt=0, description="Largest task bundle upload; larger ones get 413."
    )
    join_token_ttl_s: float = Field(
        3600.0, gt=0, description="Lifetime of a one-time host join token."
    )


class AgentSettings(_Section):
    controller_url: str = Field(
        "http://127.0.0.1:7450", description="Base URL of the controller's HTTP API."
    )
    host_name: str = Field(
        default_factory=socket.gethostname,
        description="Name this host registers under; unique in the fleet.",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$",
    )
    join_token: str | None = Field(
        None, description="One-time join token; needed only for the first join of a host."
    )
    heartbeat_interval_s: float = Field(
        2.0, gt=0, description="Seconds between heartbeats to the controller."
    )
    physical_address: str | None = Field(
        None,
        description=(
            "Address other hosts reach this host at. Empty: the source address of the "
            "route towards the controller."
        ),
    )
    request_timeout_s: float = Field(
        5.0, gt=0, description="Timeout of one request from the agent to the controller."
    )
    listen_host: str = Field(
        "127.0.0.1", description="Address of the agent's API (the controller calls it)."
    )
    listen_port: int = Field(
        7451, ge=0, le=65535, description="Port of the agent's API; 0 picks a free one."
    )
    advertise_url: str | None = Field(
        None,
        description=(
            "URL the controller uses to reach this agent's API. Empty: "
            "http://<listen address or physical address>:<port>."
        ),
    )


class Settings(_Section):
    data_dir: Path = Field(
        default_factory=_default_data_dir,
        description="Directory for the store, tokens, credentials and host state.",
    )
    log_level: str = Field("info", description="Logging level: debug, info, warning, error.")
    event_loop: Literal["uvloop", "asyncio"] = Field(
        "uvloop",
        description=(
            "Event loop of the daemons: uvloop (libuv; about a third less CPU per HTTP request "
            "and MQTT message) or the standard library's asyncio."
        ),
    )
    controller: ControllerSettings = Field(default_factory=ControllerSettings)
    agent: AgentSettings = Field(default_factory=AgentSettings)
    coordinator: CoordinatorSettings = Field(default_factory=CoordinatorSettings)
    sandbox: SandboxSettings = Field(default_factory=SandboxSettings)
    devices: DevicesSettings = Field(default_factory=DevicesSettings)
    network: NetworkSettings = Field(default_factory=NetworkSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    domains: DomainsSettings = Field(default_factory=DomainsSettings)

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str) -> str:
        if v.lower() not in {"debug", "info", "warning", "error"}:
            raise ValueError("must be one of debug, info, warning, error")
        return v.lower()

    def store_url(self) -> str:
        """The effective store URL: the configured one or SQLite in the data dir."""
        if self.controller.store_url:
            return self.controller.store_url
        return f"sqlite:///{self.data_dir / 'controller.db'}"


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in environ.items():
        if not key.startswith(ENV_PREFIX) or key == ENV_PREFIX + "CONFIG":
            continue
        dotted = key[len(ENV_PREFIX) :].lower().replace("__", ".")
        _set_path(tree, dotted, value)
    return tree


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def load_settings(
    config_file: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Build and validate the settings once, from file, environment and overrides."""
    environ = os.environ if environ is None else environ
    tree: dict[str, Any] = {}
    path = config_file
    if path is None and "EDGEVISOR_CONFIG" in environ:
        path = Path(environ["EDGEVISOR_CONFIG"])
    if path is not None:
        try:
            tree = tomllib.loads(path.read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"config file {path}: not found") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path}: invalid TOML: {exc}") from exc
    tree = _merge(tree, _env_overrides(environ))
    override_tree: dict[str, Any] = {}
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_path(override_tree, dotted, value)
    tree = _merge(tree, override_tree)
    try:
        return Settings.model_validate(tree)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "settings"
        reason = first["msg"]
        if first["type"] == "extra_forbidden":
            reason = "unknown setting"
        raise ConfigError(f"invalid setting {field}: {reason}", details={"field": field}) from exc


def describe(model: BaseModel, prefix: str = "") -> Iterator[tuple[str, Any, str]]:
    """Yield ``(dotted name, effective value, help)`` for every leaf field."""
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        dotted = f"{prefix}{name}"
        if isinstance(value, BaseModel):
            yield from describe(value, dotted + ".")
        else:
            yield dotted, value, info.description or ""

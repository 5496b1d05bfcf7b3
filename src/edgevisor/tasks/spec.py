"""Task manifests: ``edgevisor.toml`` parsed into a frozen, validated :class:`TaskSpec`.

A manifest is written by people, so it takes units (``memory = "128M"``,
``timeout = "3s"``); the model stores plain numbers with the unit in the field name
(``memory_mb``, ``timeout_s``). Every rejection is a :class:`SpecError` that names the
manifest key and the reason, e.g. ``handler: missing``.

Example::

    name = "hello"
    runtime = "python"          # python | command
    handler = "main:handler"    # module:function, or an executable path in the bundle
    memory = "128M"
    cpu = 0.5
    timeout = "3s"
    concurrency = 4
    priority = 0                # higher runs first
    network = "none"            # none | host
    [env]
    GREETING = "hi"
    [keep_warm]
    idle = "5m"                 # close an idle environment after this long
    prewarm = 1                 # environments kept started ahead of calls
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edgevisor.errors import ConfigError

__all__ = [
    "MANIFEST_NAME",
    "KeepWarm",
    "SpecError",
    "TaskSpec",
    "load_manifest",
    "parse_duration_s",
    "parse_manifest",
    "parse_size_mb",
]

MANIFEST_NAME = "edgevisor.toml"

_SIZE_RE = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(i?[bB]?)?\s*$")
_SIZE_MB = {"": 1.0, "k": 1 / 1024, "m": 1.0, "g": 1024.0, "t": 1024.0 * 1024.0}
_DUR_RE = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DUR_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_NAME_RE = r"^[a-z0-9][a-z0-9_.-]{0,62}$"
_PY_HANDLER_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class SpecError(ConfigError):
    """A manifest is invalid; ``field`` names the manifest key, ``reason`` says why."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}", details={"field": field, "reason": reason})
        self.field = field
        self.reason = reason


def parse_size_mb(value: str | int | float) -> int:
    """``"128M"`` → 128, ``"1G"`` → 1024, ``"512K"`` → 1 (rounded up); a bare number is MiB."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 128M")
    if isinstance(value, int | float):
        number, unit = float(value), ""
    else:
        m = _SIZE_RE.match(value)
        if m is None:
            raise ValueError(f"invalid size {value!r}; use e.g. 128M, 1G, 512K")
        number, unit = float(m.group(1)), m.group(2).lower()
    if number < 0:
        raise ValueError("must not be negative")
    mb = number * _SIZE_MB[unit]
    return max(1, int(-(-mb // 1))) if mb > 0 else 0


def parse_duration_s(value: str | int | float) -> float:
    """``"3s"`` → 3.0, ``"500ms"`` → 0.5, ``"2m"`` → 120.0; a bare number is seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 3s")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        m = _DUR_RE.match(value)
        if m is None:
            raise ValueError(f"invalid duration {value!r}; use e.g. 500ms, 3s, 2m, 1h")
        seconds = float(m.group(1)) * _DUR_S[m.group(2)]
    if seconds < 0:
        raise ValueError("must not be negative")
    return seconds


class KeepWarm(BaseModel):
    """How long an idle environment is kept, and how many are started ahead of calls."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    idle_s: float = Field(300.0, ge=0, description="Idle seconds before a warm env is closed.")
    prewarm: int = Field(0, ge=0, le=64, description="Environments kept started ahead of calls.")


class TaskSpec(BaseModel):
    """A validated task manifest."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(..., pattern=_NAME_RE, description="Task name, unique on a host.")
    runtime: Literal["python", "command"] = Field(..., description="python or command.")
    handler: str = Field(..., min_length=1, description="module:function or executable path.")
    memory_mb: int = Field(128, gt=0, description="Memory limit of one environment, MiB.")
    cpu: float = Field(0.5, gt=0, le=64, description="CPU share of one core while running.")
    timeout_s: float = Field(3.0, gt=0, description="Wall-clock limit of one call.")
    concurrency: int = Field(4, ge=1, le=1024, description="Calls of this task running at once.")
    env: dict[str, str] = Field(default_factory=dict, description="Environment variables.")
    keep_warm: KeepWarm = Field(default_factory=KeepWarm, description="Keep-warm policy.")
    priority: int = Field(0, ge=-100, le=100, description="Higher runs first.")
    network: Literal["none", "host"] = Field("none", description="none or host networking.")

    @field_validator("handler")
    @classmethod
    def _handler_shape(cls, v: str, info: Any) -> str:
        runtime = info.data.get("runtime")
        if runtime == "python" and not _PY_HANDLER_RE.match(v):
            raise ValueError("python handler must be module:function")
        if runtime == "command":
            p = PurePosixPath(v)
            if p.is_absolute() or ".." in p.parts:
                raise ValueError("command handler must be a relative path inside the bundle")
        return v

    @field_validator("env")
    @classmethod
    def _env_names(cls, v: dict[str, str]) -> dict[str, str]:
        for key in v:
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
                raise ValueError(f"invalid variable name {key!r}")
        return v


# manifest key → (model field, converter); keys not listed map to themselves unchanged
_CONVERT: dict[str, tuple[str, Any]] = {
    "memory": ("memory_mb", parse_size_mb),
    "memory_mb": ("memory_mb", None),
    "timeout": ("timeout_s", parse_duration_s),
    "timeout_s": ("timeout_s", None),
}
_FIELD_TO_KEY = {"memory_mb": "memory", "timeout_s": "timeout"}


def _fail_from(exc: ValidationError) -> SpecError:
    first = exc.errors()[0]
    loc = [str(p) for p in first["loc"]]
    if loc and loc[0] in _FIELD_TO_KEY:
        loc[0] = _FIELD_TO_KEY[loc[0]]
    if loc[:2] == ["keep_warm", "idle_s"]:
        loc[1] = "idle"
    field = ".".join(loc) or "manifest"
    kind = first["type"]
    if kind == "missing":
        reason = "missing"
    elif kind == "extra_forbidden":
        reason = "unknown key"
    elif kind == "literal_error" and loc == ["runtime"]:
        reason = f"unknown runtime {first.get('input')!r}; use python or command"
    else:
        reason = str(first["msg"]).removeprefix("Value error, ")
    return SpecError(field, reason)


def parse_manifest(data: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> TaskSpec:
    """Validate a manifest mapping (as read from TOML), with optional overrides on top."""
    raw = {**data, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        field, conv = _CONVERT.get(key, (key, None))
        if conv is not None:
            try:
                value = conv(value)
            except ValueError as exc:
                raise SpecError(key, str(exc)) from exc
        kwargs[field] = value
    kw = kwargs.get("keep_warm")
    if isinstance(kw, Mapping):
        kw = dict(kw)
        if "idle" in kw:
            try:
                kw["idle_s"] = parse_duration_s(kw.pop("idle"))
            except ValueError as exc:
                raise SpecError("keep_warm.idle", str(exc)) from exc
        kwargs["keep_warm"] = kw
    try:
        return TaskSpec.model_validate(kwargs)
    except ValidationError as exc:
        raise _fail_from(exc) from exc


def load_manifest(bundle_dir: Path, overrides: Mapping[str, Any] | None = None) -> TaskSpec:
    """Read ``edgevisor.toml`` from an unpacked bundle and check the handler exists."""
    path = bundle_dir / MANIFEST_NAME
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise SpecError("manifest", f"{MANIFEST_NAME} not found in the bundle") from exc
    except tomllib.TOMLDecodeError as exc:
        raise SpecError("manifest", f"invalid TOML: {exc}") from exc
    spec = parse_manifest(data, overrides)
    if spec.runtime == "command":
        exe = bundle_dir / spec.handler
        if not exe.is_file():
            raise SpecError("handler", f"{spec.handler} not found in the bundle")
        if not exe.stat().st_mode & 0o111:
            raise SpecError("handler", f"{spec.handler} is not executable")
    else:
        module = spec.handler.split(":", 1)[0].replace(".", "/")
        if not ((bundle_dir / f"{module}.py").is_file() or (bundle_dir / module).is_dir()):
            raise SpecError("handler", f"module {module}.py not found in the bundle")
    return spec

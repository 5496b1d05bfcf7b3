"""Task manifests: units, validation errors naming the field, manifest files."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgevisor.errors import ConfigError
from edgevisor.tasks.spec import (
    SpecError,
    TaskSpec,
    load_manifest,
    parse_duration_s,
    parse_manifest,
    parse_size_mb,
)

BASE = {"name": "hello", "runtime": "python", "handler": "main:handler"}


@pytest.mark.parametrize(
    ("text", "mb"),
    [
        ("128M", 128),
        ("1G", 1024),
        ("1Gi", 1024),
        ("512K", 1),
        ("64", 64),
        (256, 256),
        ("0.5G", 512),
    ],
)
def test_sizes_with_units(text: str | int, mb: int) -> None:
    assert parse_size_mb(text) == mb


@pytest.mark.parametrize(
    ("text", "s"), [("3s", 3.0), ("500ms", 0.5), ("2m", 120.0), ("1h", 3600.0), (5, 5.0)]
)
def test_durations_with_units(text: str | int, s: float) -> None:
    assert parse_duration_s(text) == s


@pytest.mark.parametrize("bad", ["lots", "12X", "", "1.2.3M"])
def test_bad_size_is_rejected(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid size"):
        parse_size_mb(bad)


def test_full_manifest_parses_to_model_fields() -> None:
    spec = parse_manifest(
        {
            **BASE,
            "memory": "256M",
            "cpu": 0.25,
            "timeout": "1500ms",
            "concurrency": 2,
            "priority": 5,
            "network": "host",
            "env": {"GREETING": "hi"},
            "keep_warm": {"idle": "2m", "prewarm": 1},
        }
    )
    assert spec.memory_mb == 256
    assert spec.cpu == 0.25
    assert spec.timeout_s == 1.5
    assert spec.concurrency == 2
    assert spec.priority == 5
    assert spec.network == "host"
    assert spec.env == {"GREETING": "hi"}
    assert spec.keep_warm.idle_s == 120.0
    assert spec.keep_warm.prewarm == 1
    with pytest.raises(Exception):  # noqa: B017 - frozen model
        spec.memory_mb = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("manifest", "field", "reason"),
    [
        ({"name": "x", "runtime": "python"}, "handler", "missing"),
        ({**BASE, "runtime": "rust"}, "runtime", "unknown runtime 'rust'"),
        ({**BASE, "memory": "-128M"}, "memory", "must not be negative"),
        ({**BASE, "timeout": "-1s"}, "timeout", "must not be negative"),
        ({**BASE, "memory": 0}, "memory", "greater than 0"),
        ({**BASE, "cpu": -0.5}, "cpu", "greater than 0"),
        ({**BASE, "concurrency": 0}, "concurrency", "greater than or equal to 1"),
        ({**BASE, "handler": "main"}, "handler", "module:function"),
        ({**BASE, "network": "bridge"}, "network", ""),
        ({**BASE, "colour": "red"}, "colour", "unknown key"),
        ({**BASE, "name": "Bad Name"}, "name", ""),
        ({**BASE, "keep_warm": {"idle": "soon"}}, "keep_warm.idle", "invalid duration"),
        ({**BASE, "keep_warm": {"prewarm": -1}}, "keep_warm.prewarm", ""),
        ({**BASE, "env": {"1BAD": "x"}}, "env", "invalid variable name"),
        (
            {"name": "x", "runtime": "command", "handler": "../../bin/sh"},
            "handler",
            "relative path inside the bundle",
        ),
    ],
)
def test_invalid_manifest_names_field_and_reason(
    manifest: dict[str, object], field: str, reason: str
) -> None:
    with pytest.raises(SpecError) as info:
        parse_manifest(manifest)
    assert info.value.field == field
    assert reason in info.value.reason
    assert isinstance(info.value, ConfigError)
    assert info.value.status == 400
    assert info.value.details["field"] == field


def test_overrides_win_over_manifest() -> None:
    spec = parse_manifest({**BASE, "memory": "128M"}, {"memory": "512M", "cpu": None})
    assert spec.memory_mb == 512
    assert spec.cpu == TaskSpec.model_fields["cpu"].default


def test_load_manifest_python(tmp_path: Path) -> None:
    (tmp_path / "edgevisor.toml").write_text(
        'name = "hello"\nruntime = "python"\nhandler = "main:handler"\nmemory = "64M"\n'
    )
    with pytest.raises(SpecError, match=r"handler: module main\.py not found"):
        load_manifest(tmp_path)
    (tmp_path / "main.py").write_text("def handler(e, c):\n    return e\n")
    assert load_manifest(tmp_path).memory_mb == 64


def test_load_manifest_command_needs_executable(tmp_path: Path) -> None:
    (tmp_path / "edgevisor.toml").write_text(
        'name = "cmd"\nruntime = "command"\nhandler = "run.sh"\n'
    )
    with pytest.raises(SpecError, match="not found"):
        load_manifest(tmp_path)
    exe = tmp_path / "run.sh"
    exe.write_text("#!/bin/sh\ncat\n")
    exe.chmod(0o644)
    with pytest.raises(SpecError, match="not executable"):
        load_manifest(tmp_path)
    exe.chmod(0o755)
    assert load_manifest(tmp_path).runtime == "command"


def test_load_manifest_missing_or_broken(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="not found"):
        load_manifest(tmp_path)
    (tmp_path / "edgevisor.toml").write_text("name = \n")
    with pytest.raises(SpecError, match="invalid TOML"):
        load_manifest(tmp_path)

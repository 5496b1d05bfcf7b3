from pathlib import Path

import pytest

from edgevisor.errors import ConfigError
from edgevisor.settings import Settings, describe, load_settings


def test_defaults_are_embedded_and_valid() -> None:
    s = load_settings(environ={})
    assert s.controller.listen_host == "127.0.0.1"
    assert s.controller.listen_port == 7450
    assert s.store_url().startswith("sqlite:///")
    assert s.store_url().endswith("controller.db")


def test_precedence_file_then_env_then_overrides(tmp_path: Path) -> None:
    cfg = tmp_path / "ev.toml"
    cfg.write_text(
        'log_level = "debug"\n[controller]\nlisten_port = 1000\nheartbeat_timeout_s = 3\n'
    )
    env = {"EDGEVISOR_CONTROLLER__LISTEN_PORT": "2000"}
    s = load_settings(cfg, environ=env)
    assert (s.log_level, s.controller.listen_port, s.controller.heartbeat_timeout_s) == (
        "debug",
        2000,
        3.0,
    )
    s = load_settings(cfg, {"controller.listen_port": 3000}, environ=env)
    assert s.controller.listen_port == 3000


def test_config_file_from_environment(tmp_path: Path) -> None:
    cfg = tmp_path / "ev.toml"
    cfg.write_text("[agent]\nheartbeat_interval_s = 0.5\n")
    s = load_settings(environ={"EDGEVISOR_CONFIG": str(cfg)})
    assert s.agent.heartbeat_interval_s == 0.5


@pytest.mark.parametrize(
    ("env", "field", "reason"),
    [
        ({"EDGEVISOR_CONTROLLER__LISTEN_PORT": "70000"}, "controller.listen_port", "less than"),
        ({"EDGEVISOR_CONTROLLER__LISTEN_PORT": "x"}, "controller.listen_port", "integer"),
        ({"EDGEVISOR_CONTROLLER__NOPE": "1"}, "controller.nope", "unknown setting"),
        ({"EDGEVISOR_LOG_LEVEL": "loud"}, "log_level", "one of"),
        ({"EDGEVISOR_AGENT__HOST_NAME": "bad name"}, "agent.host_name", "pattern"),
        ({"EDGEVISOR_CONTROLLER__HEARTBEAT_TIMEOUT_S": "-1"}, "heartbeat_timeout_s", "greater"),
    ],
)
def test_invalid_config_names_field_and_reason(
    env: dict[str, str], field: str, reason: str
) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(environ=env)
    assert field in err.value.message
    assert reason in err.value.message


def test_bad_toml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[controller\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_settings(bad, environ={})
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "missing.toml", environ={})


def test_settings_are_frozen_and_every_field_documented() -> None:
    s = load_settings(environ={})
    with pytest.raises(ValueError):
        s.log_level = "debug"  # type: ignore[misc]
    rows = list(describe(s))
    assert {name for name, _v, _h in rows} >= {
        "data_dir",
        "controller.listen_port",
        "agent.host_name",
    }
    undocumented = [name for name, _v, help_ in rows if not help_]
    assert undocumented == []
    assert isinstance(s, Settings)

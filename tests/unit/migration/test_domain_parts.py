"""The pure parts of domains: restart policy, names, addresses, the sandbox argv."""

from __future__ import annotations

from ipaddress import IPv4Address
from pathlib import Path

import pytest

from edgevisor.errors import RequestError
from edgevisor.migration.domain_parts import (
    DomainSpec,
    DomainsSettings,
    domain_argv,
    domain_env,
    domain_tag,
    host_tag,
    netns_name,
    netns_prefix,
    restart_delay,
    slot_address,
    validate_name,
)

S = DomainsSettings(backoff_initial_s=0.5, backoff_max_s=8.0)


def spec(**kw: object) -> DomainSpec:
    base: dict[str, object] = dict(
        account="acme", name="kv", command=("/usr/bin/python3", "/task/kv.py"),
        volume="domain-kv", volume_size_bytes=64 << 20,
    )  # fmt: skip
    base.update(kw)
    return DomainSpec.model_validate(base)


@pytest.mark.parametrize(
    ("policy", "status", "failures", "expected"),
    [
        ("never", 1, 0, None),
        ("never", 0, 0, None),
        ("on-failure", 0, 0, None),
        ("on-failure", 3, 0, 0.5),
        ("on-failure", 137, 1, 1.0),
        ("on-failure", 1, 3, 4.0),
        ("on-failure", 1, 10, 8.0),  # capped
        ("always", 0, 0, 0.5),
        ("always", 0, 2, 2.0),
    ],
)
def test_restart_delay_by_policy(
    policy: str, status: int, failures: int, expected: float | None
) -> None:
    assert restart_delay(policy, status, failures, S) == expected  # type: ignore[arg-type]


def test_restart_gives_up_after_max_restarts() -> None:
    s = DomainsSettings(max_restarts=3)
    assert restart_delay("always", 1, 2, s) is not None
    assert restart_delay("always", 1, 3, s) is None
    assert restart_delay("always", 1, 10_000, DomainsSettings()) == 30.0  # no overflow


def test_names_are_per_host_and_fit_kernel_limits() -> None:
    a = netns_name("h1", "acme.kv")
    assert a.startswith(netns_prefix("h1"))
    assert not a.startswith(netns_prefix("h2"))
    assert a != netns_name("h2", "acme.kv") != netns_name("h1", "acme.kv2")
    assert host_tag("a") != host_tag("a-b")
    assert len(domain_tag("h", "x" * 200)) == 10


def test_slot_addresses_skip_the_network_and_refuse_overflow() -> None:
    assert slot_address("169.254.192.0/20", 1) == IPv4Address("169.254.192.2")
    assert slot_address("169.254.192.0/30", 1) == IPv4Address("169.254.192.2")
    with pytest.raises(RequestError):
        slot_address("169.254.192.0/30", 2)
    assert IPv4Address("169.254.169.254") not in [
        slot_address(S.test_subnet, i) for i in range(0, 4000, 97)
    ]


@pytest.mark.parametrize("name", ["kv", "a", "my-db-1", "x" * 40])
def test_valid_names(name: str) -> None:
    assert validate_name("domain", name) == name


@pytest.mark.parametrize("name", ["", "-a", "a-", "A", "a.b", "a_b", "x" * 41, "a/b"])
def test_invalid_names(name: str) -> None:
    with pytest.raises(RequestError):
        validate_name("domain", name)


def test_spec_refuses_bad_policy_and_empty_command() -> None:
    with pytest.raises(ValueError):
        spec(restart="sometimes")
    with pytest.raises(ValueError):
        spec(command=())
    assert spec().volume_id == "acme.domain-kv"
    assert spec().qualified == "acme.kv"


def test_argv_binds_volume_drops_privileges_and_keeps_the_netns(tmp_path: Path) -> None:
    argv = domain_argv(
        spec(), app_dir=tmp_path / "app", empty_dir=tmp_path / "e", volume_dir=tmp_path / "mnt",
        settings=S, uid=65534, gid=65534, block_fd=5, info_fd=6,
    )  # fmt: skip
    cut = argv.index("--")
    sandbox, inside = argv[:cut], argv[cut + 1 :]
    assert sandbox[0] == "bwrap"
    i = sandbox.index("--bind")
    assert sandbox[i + 1 : i + 3] == [str(tmp_path / "mnt"), "/data"]
    assert "--unshare-pid" in sandbox and "--die-with-parent" in sandbox
    assert "--unshare-net" not in sandbox  # started inside the domain's own namespace
    assert sandbox[sandbox.index("--cap-drop") : sandbox.index("--cap-drop") + 2] == [
        "--cap-drop",
        "ALL",
    ]
    assert inside[0].endswith("setpriv") and "--reuid=65534" in inside
    assert inside[-2:] == ["/usr/bin/python3", "/task/kv.py"]
    j = sandbox.index("--ro-bind", sandbox.index("--tmpfs"))
    assert sandbox[j + 1 : j + 3] == [str(tmp_path / "app"), "/task"]


def test_env_names_the_domain_and_user_values_win() -> None:
    env = domain_env(spec(env={"PATH": "/x", "A": "1"}), S, "169.254.192.2")
    assert env["PATH"] == "/x" and env["A"] == "1"
    assert env["EDGEVISOR_DATA"] == "/data" and env["EDGEVISOR_ADDRESS"] == "169.254.192.2"


def test_status_changes_skip_creating_and_unreported_rows() -> None:
    from edgevisor.control.api_domains import status_changes

    stored = [
        (1, "acme.kv", "running", 0),
        (2, "acme.new", "creating", 0),
        (3, "acme.gone", "running", 0),
        (4, "other.kv", "running", 1),
    ]
    reported = {
        ("acme", "kv"): {"phase": "backoff", "restarts": 1},
        ("acme", "new"): {"phase": "running", "restarts": 0},
        ("other", "kv"): {"phase": "running", "restarts": 1},
    }
    assert status_changes(stored, reported) == [(1, "acme.kv", "backoff", 1)]


def test_step_clock_marks_sequential_and_concurrent_steps() -> None:
    from edgevisor.migration.domain_parts import StepClock

    now = [10.0]
    clock = StepClock(lambda: now[0])
    now[0] = 10.5
    clock.mark("a")
    t0 = clock.now()
    now[0] = 11.0
    clock.since(t0, "b")
    now[0] = 11.25
    clock.since(t0, "c")
    clock.skip()
    now[0] = 12.0
    clock.mark("d")
    assert clock.done() == {"a": 0.5, "b": 0.5, "c": 0.75, "d": 0.75, "total": 2.0}

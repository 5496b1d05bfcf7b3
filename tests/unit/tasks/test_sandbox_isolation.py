"""The bubblewrap command line of an isolated environment (pure)."""

from __future__ import annotations

from pathlib import Path

from edgevisor.tasks.environment import EnvSpec
from edgevisor.tasks.isolation import bwrap_argv, hostname_for, setpriv_argv


def spec(**kw: object) -> EnvSpec:
    base: dict[str, object] = dict(
        task="my task", version="v", bundle_dir=Path("/data/bundles/abc"), runtime="python",
        handler="m:f", memory_mb=64, cpu=0.5, timeout_s=1.0, tmp_mb=16,
    )
    base.update(kw)
    return EnvSpec(**base)  # type: ignore[arg-type]


def argv(s: EnvSpec, prefix: str = "/opt/py/3.11") -> list[str]:
    return bwrap_argv(s, runtime_dir=Path("/var/rt"), command=["py", "-c", "x"], uid=1234,
                      gid=4321, block_fd=7, info_fd=8, prefix=Path(prefix))


def pairs(args: list[str], flag: str) -> list[tuple[str, str]]:
    return [(args[i + 1], args[i + 2]) for i, a in enumerate(args) if a == flag]


def test_namespaces_and_no_network_by_default() -> None:
    a = argv(spec())
    sandbox = a[: a.index("--")]
    for flag in ("--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-net",
                 "--die-with-parent", "--new-session"):
        assert flag in sandbox
    assert "--unshare-user" not in sandbox and "--unshare-all" not in sandbox
    assert ("/data/bundles/abc", "/task") in pairs(a, "--ro-bind")
    assert ("/var/rt", "/.edgevisor") in pairs(a, "--ro-bind")
    assert ("/opt/py/3.11", "/opt/py/3.11") in pairs(a, "--ro-bind")
    assert a[a.index("--tmpfs") - 2 : a.index("--tmpfs") + 2] == [
        "--size", str(16 << 20), "--tmpfs", "/tmp"
    ]
    assert a[a.index("--block-fd") + 1] == "7" and a[a.index("--info-fd") + 1] == "8"
    assert a[a.index("--chdir") + 1] == "/task"
    assert a[a.index("--hostname") + 1] == "ev-my-task"


def test_host_network_is_opt_in_with_resolver_files() -> None:
    a = argv(spec(network="host"))
    assert "--unshare-net" not in a
    ro = [src for src, _ in pairs(a, "--ro-bind")]
    assert not any(p.startswith("/etc") for p in ro if not Path(p).exists())


def test_capabilities_dropped_and_uid_switched_by_setpriv() -> None:
    a = argv(spec())
    caps = [a[i + 1] for i, x in enumerate(a) if x == "--cap-add"]
    assert sorted(caps) == ["CAP_SETGID", "CAP_SETPCAP", "CAP_SETUID"]
    assert a[a.index("--cap-drop") + 1] == "ALL"
    tail = a[a.index("--") + 1 :]
    assert tail[: len(setpriv_argv(1234, 4321))] == setpriv_argv(1234, 4321)
    assert "--reuid=1234" in tail and "--regid=4321" in tail
    assert {"--clear-groups", "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs"} <= set(
        tail
    )
    assert tail[-3:] == ["py", "-c", "x"]


def test_prefix_ancestors_are_made_traversable() -> None:
    a = argv(spec(), prefix="/root/.pyenv/versions/3.11.7")
    dirs = [(a[i - 1], a[i + 1]) for i, x in enumerate(a) if x == "--dir"]
    assert ("0755", "/root") in dirs and ("0755", "/root/.pyenv/versions") in dirs
    assert a.index("--dir") < a.index("/root/.pyenv/versions/3.11.7")


def test_prefix_under_usr_needs_no_extra_bind() -> None:
    a = argv(spec(), prefix="/usr")
    assert ("/usr", "/usr") in pairs(a, "--ro-bind")
    assert "--dir" not in a


def test_hostname_is_sanitised_and_bounded() -> None:
    assert hostname_for("a.b/c") == "ev-a-b-c"
    assert len(hostname_for("x" * 200)) == 63

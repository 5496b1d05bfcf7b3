"""``edgevisor domain create|list|show|start|stop|rm`` (SDK only)."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated, Any

import typer

from edgevisor.cli.admin import JsonOpt, TokenOpt, UrlOpt, client
from edgevisor.cli.output import ago, console, emit_json, fail, table
from edgevisor.errors import NotFound
from edgevisor.sdk.domains import DomainInfo
from edgevisor.sdk.migrations import MigrationInfo

domain_app = typer.Typer(
    help="Domains: long-lived isolated environments with a volume.", no_args_is_help=True
)
AccountOpt = Annotated[
    str | None, typer.Option("--account", "-a", help="Account (admin token only).")
]
COLUMNS = ["name", "account", "host", "phase", "restarts", "address", "volume", "command"]


def register(app: typer.Typer) -> None:
    app.add_typer(domain_app, name="domain")


def _size(n: int) -> str:
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f}{unit}".replace(".0", "")
    return f"{n}B"


def _rows(domains: list[DomainInfo]) -> list[list[Any]]:
    return [
        [
            d.name,
            d.account,
            d.host,
            d.phase,
            d.restart_count,
            d.address or "-",
            f"{d.volume} ({_size(d.volume_size_bytes)})",
            shlex.join(d.command),
        ]
        for d in domains
    ]


def _show(d: DomainInfo, as_json: bool) -> None:
    if as_json:
        emit_json(d)
        return
    table(COLUMNS, _rows([d]))
    console.print(
        f"restart policy {d.restart}, memory {d.memory_mb} MiB, cpu {d.cpu}, "
        f"role {d.role}, desired {d.desired}, updated {ago(d.updated_at)}"
    )
    if d.network:
        console.print(
            f"logical address {d.address} of network {d.network} (record {d.address_record_id})"
        )
    if d.live and d.live.get("log"):
        console.print(f"log on {d.host}: {d.live['log']}")


@domain_app.command("create")
def create(
    name: str,
    command: Annotated[str, typer.Option("--command", help="Command line run inside.")],
    volume_size: Annotated[str, typer.Option("--volume-size", help="e.g. 1G")] = "1G",
    app: Annotated[
        Path | None, typer.Option("--app", help="Directory or .tar.gz, read-only at /task.")
    ] = None,
    host: Annotated[str | None, typer.Option("--host", help="Host to run on.")] = None,
    restart: Annotated[
        str, typer.Option("--restart", help="never | on-failure | always")
    ] = "on-failure",
    memory: Annotated[int | None, typer.Option("--memory-mb", help="Memory limit.")] = None,
    cpu: Annotated[float | None, typer.Option("--cpu", help="Share of a core.")] = None,
    env: Annotated[list[str] | None, typer.Option("--env", "-e", help="KEY=VALUE")] = None,
    network: Annotated[
        str | None,
        typer.Option("--network", help="Network of the account to take a logical address from."),
    ] = None,
    address: Annotated[
        str | None, typer.Option("--address", help="A specific address in --network.")
    ] = None,
    claim: Annotated[
        str | None,
        typer.Option("--claim", help="A preserved address of the account (or its record id)."),
    ] = None,
    account: AccountOpt = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a domain with a new volume (mounted at /data) and start it.

    With --network (or --claim) the domain gets a logical address of its account: inside
    it sees only that address and reaches the account's other instances by theirs.
    """
    argv = shlex.split(command)
    if not argv:
        fail("--command is empty")
    if restart not in ("never", "on-failure", "always"):
        fail(f"--restart must be never, on-failure or always, not {restart!r}")
    if app is not None and not app.exists():
        fail(f"{app}: no such directory or archive")
    if address is not None and network is None:
        fail("--address needs --network")
    if address is not None and claim is not None:
        fail("give --address or --claim, not both")
    variables = {}
    for item in env or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            fail(f"--env {item!r}: use KEY=VALUE")
        variables[key] = value
    with client(url, token) as c:
        d = c.create_domain(
            name, argv, volume_size, account=account, app=app, host=host, restart=restart,
            memory_mb=memory, cpu=cpu, env=variables, network=network, address=address,
            claim=claim,
        )  # fmt: skip
    if as_json:
        emit_json(d)
    else:
        console.print(f"domain {d.name} {d.phase} on {d.host} at {d.address or '-'}")


@domain_app.command("list")
def domain_list(url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """Domains this token can see (as last reported by their hosts)."""
    with client(url, token) as c:
        domains = c.list_domains()
    if as_json:
        emit_json(domains)
    else:
        table(COLUMNS, _rows(domains))


@domain_app.command("show")
def show(
    name: str,
    account: AccountOpt = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """One domain, with the live state from its host and its current (or last) migration."""
    with client(url, token) as c:
        d = c.get_domain(name, account)
        try:
            mig: MigrationInfo | None = c.domain_migration(name, account)
        except NotFound:
            mig = None
    if as_json:
        emit_json({**d.model_dump(mode="json"), "migration": mig})
        return
    _show(d, False)
    if mig is not None:
        console.print(_migration_line(mig))


def _migration_line(m: MigrationInfo) -> str:
    """Progress of the domain's migration: phase, bytes present (never backwards), ETA."""
    pct = 100.0 * m.present_bytes / m.total_bytes if m.total_bytes else 100.0
    parts = [
        f"migration {m.id} {m.source} -> {m.target} ({m.mode}): {m.phase}",
        f"{m.present_bytes / 2**20:.0f}/{m.total_bytes / 2**20:.0f} MiB present ({pct:.0f}%)",
    ]
    if m.rate_bytes_s:
        parts.append(f"{m.rate_bytes_s / 2**20:.0f} MiB/s")
    if m.eta_s is not None and not m.final:
        parts.append(f"ETA {m.eta_s:.0f}s")
    if m.downtime_s is not None:
        parts.append(f"switch downtime {m.downtime_s * 1000:.0f} ms")
    if m.blocked_on:
        parts.append(f"waiting for {m.blocked_on}")
    if m.reason:
        parts.append(m.reason)
    return ", ".join(parts)


@domain_app.command("start")
def start(
    name: str,
    account: AccountOpt = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Start a stopped domain on its host (its volume keeps its data)."""
    with client(url, token) as c:
        _show(c.start_domain(name, account), as_json)


@domain_app.command("stop")
def stop(
    name: str,
    account: AccountOpt = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Stop a domain (processes, mounts and namespace go; the volume stays)."""
    with client(url, token) as c:
        _show(c.stop_domain(name, account), as_json)


@domain_app.command("rm")
def rm(
    name: str,
    release: Annotated[
        bool, typer.Option("--release", help="Release its logical address (default: preserve).")
    ] = False,
    account: AccountOpt = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """Stop a domain and delete it with its volume.

    Its logical address, if any, stays with the account (preserved: another domain can
    --claim it) unless --release.
    """
    with client(url, token) as c:
        c.remove_domain(name, account, release=release)
    console.print(f"domain {name} removed")

"""CLI commands that talk to a running controller, through the SDK only."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any, TypeVar

import typer

from edgevisor.cli.output import ago, console, emit_json, fail, render, table
from edgevisor.errors import EdgevisorError
from edgevisor.sdk.client import Client

T = TypeVar("T")

UrlOpt = Annotated[
    str | None, typer.Option("--url", help="Controller URL.", envvar="EDGEVISOR_URL")
]
TokenOpt = Annotated[
    str | None, typer.Option("--token", help="Bearer token.", envvar="EDGEVISOR_TOKEN")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


@contextmanager
def client(url: str | None, token: str | None) -> Iterator[Client]:
    try:
        with Client(url, token) as c:
            yield c
    except EdgevisorError as exc:
        fail(f"{exc.code}: {exc.message}")


account_app = typer.Typer(help="Accounts: who owns tasks, domains and addresses.")
token_app = typer.Typer(help="Bearer tokens scoped to an account.")
host_app = typer.Typer(help="Hosts in the fleet.")


def register(app: typer.Typer) -> None:
    for sub in (account_app, token_app, host_app):
        sub.info.no_args_is_help = True
    app.add_typer(account_app, name="account")
    app.add_typer(token_app, name="token")
    app.add_typer(host_app, name="host")
    app.command("events")(events)
    app.command("whoami")(whoami)


def _run(url: str | None, token: str | None, fn: Callable[[Client], T]) -> T:
    with client(url, token) as c:
        return fn(c)


@account_app.command("create")
def account_create(
    name: str, url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False
) -> None:
    """Create an account (admin)."""
    render(_run(url, token, lambda c: c.create_account(name)), as_json, ["name"])


@account_app.command("list")
def account_list(url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """List the accounts this token can see."""
    render(_run(url, token, lambda c: c.list_accounts()), as_json, ["name", "created_at"])


@account_app.command("rm")
def account_rm(name: str, url: UrlOpt = None, token: TokenOpt = None) -> None:
    """Delete an account and its tokens (admin)."""
    _run(url, token, lambda c: c.delete_account(name))
    console.print(f"account {name} deleted")


@token_app.command("create")
def token_create(
    account: Annotated[str | None, typer.Option("--account", "-a", help="Account.")] = None,
    name: Annotated[str, typer.Option("--name", help="A label for the token.")] = "default",
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a token for an account; the secret is shown once."""
    out = _run(url, token, lambda c: c.create_token(account, name))
    if as_json:
        emit_json(out)
        return
    console.print(f"token {out.id} for account {out.account}:")
    console.print(out.secret, soft_wrap=True, highlight=False)


@token_app.command("list")
def token_list(url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """List tokens (never their secrets)."""
    render(
        _run(url, token, lambda c: c.list_tokens()),
        as_json,
        ["id", "name", "account", "admin", "revoked_at"],
    )


@token_app.command("revoke")
def token_revoke(token_id: int, url: UrlOpt = None, token: TokenOpt = None) -> None:
    """Revoke a token by id."""
    _run(url, token, lambda c: c.revoke_token(token_id))
    console.print(f"token {token_id} revoked")


def _host_rows(hosts: list[Any]) -> list[list[Any]]:
    now = time.time()
    return [
        [
            h.name,
            h.state,
            h.cpu_count,
            f"{h.memory_mb} MiB",
            f"{h.disk_mb / 1024:.1f} GiB",
            h.physical_address,
            ago(h.last_heartbeat_at, now),
        ]
        for h in hosts
    ]


HOST_COLUMNS = ["name", "state", "cpus", "memory", "disk free", "address", "last heartbeat"]


@host_app.command("list")
def host_list(url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """Hosts with their state, capacity and last heartbeat."""
    hosts = _run(url, token, lambda c: c.list_hosts())
    if as_json:
        emit_json(hosts)
    else:
        table(HOST_COLUMNS, _host_rows(hosts))


@host_app.command("show")
def host_show(
    name: str, url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False
) -> None:
    """One host."""
    h = _run(url, token, lambda c: c.get_host(name))
    if as_json:
        emit_json(h)
    else:
        table(HOST_COLUMNS, _host_rows([h]))


@host_app.command("rm")
def host_rm(name: str, url: UrlOpt = None, token: TokenOpt = None) -> None:
    """Forget a host (admin); it must join again with a new join token."""
    _run(url, token, lambda c: c.remove_host(name))
    console.print(f"host {name} removed")


@host_app.command("join-token")
def host_join_token(
    host: Annotated[str | None, typer.Option("--host", help="Only for this host name.")] = None,
    ttl: Annotated[float | None, typer.Option("--ttl", help="Lifetime in seconds.")] = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a one-time join token for a new agent (admin)."""
    out = _run(url, token, lambda c: c.create_join_token(host, ttl))
    if as_json:
        emit_json(out)
    else:
        console.print(out.secret, soft_wrap=True, highlight=False)


def events(
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep streaming.")] = False,
    after: Annotated[int, typer.Option("--after", help="Only events after this id.")] = 0,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show the event log; with --follow, stream it (SSE)."""
    with client(url, token) as c:
        evs = c.events(after) if follow else iter(c.recent_events(after))
        try:
            for ev in evs:
                if as_json:
                    emit_json(ev)
                else:
                    when = time.strftime("%H:%M:%S", time.localtime(ev.at))
                    console.print(f"{ev.id:>6} {when} {ev.kind:<20} {ev.subject} {ev.data or ''}")
        except KeyboardInterrupt:
            pass


def whoami(url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """Who the token is."""
    render(_run(url, token, lambda c: c.whoami()), as_json, ["kind", "account", "token_id"])

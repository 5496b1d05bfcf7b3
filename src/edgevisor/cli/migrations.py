"""``edgevisor domain migrate NAME --to HOST [--watch] [--abort] [--rate 200M] [--mode]``.

Added to the ``domain`` command group of :mod:`edgevisor.cli.domains` (SDK only). With
``--watch`` a rich progress bar follows the migration until it ends: bytes present on the
target (the bar never goes backwards, even if a report arrives late), rate, ETA, phase,
and the switch downtime once known. The exit status is 0 only for a committed migration.
"""

from __future__ import annotations

import time
from typing import Annotated

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from edgevisor.cli.admin import JsonOpt, TokenOpt, UrlOpt, client
from edgevisor.cli.domains import domain_app
from edgevisor.cli.output import console, emit_json, fail, table
from edgevisor.sdk.client import Client
from edgevisor.sdk.migrations import MigrationInfo
from edgevisor.sdk.volumes import parse_size

AccountOpt = Annotated[
    str | None, typer.Option("--account", "-a", help="Account (admin token only).")
]
COLUMNS = ["id", "domain", "source", "target", "mode", "phase", "present", "downtime", "reason"]


def register(app: typer.Typer) -> None:
    """The command lives in the ``domain`` group (already registered by the domains CLI)."""
    del app  # registered on import below; kept for the main module's uniform wiring


def _row(m: MigrationInfo) -> list[object]:
    pct = 100.0 * m.present_bytes / m.total_bytes if m.total_bytes else 100.0
    down = f"{m.downtime_s * 1000:.0f} ms" if m.downtime_s is not None else "-"
    return [m.id, m.domain, m.source, m.target, m.mode, m.phase, f"{pct:.0f}%", down, m.reason]


def _summary(m: MigrationInfo) -> str:
    down = f", switch downtime {m.downtime_s * 1000:.0f} ms" if m.downtime_s is not None else ""
    why = f" ({m.reason})" if m.reason else ""
    return f"migration {m.id}: {m.phase}{why}{down}"


def watch(c: Client, m: MigrationInfo, interval_s: float = 0.2) -> MigrationInfo:
    """Follow ``m`` with a progress bar until it is final and settled; returns the last."""
    shown = 0  # the bar never goes backwards, whatever order reports arrive in
    with Progress(
        TextColumn("[bold]{task.fields[phase]:<10}"),
        BarColumn(),
        TaskProgressColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[note]}"),
        console=console,
        transient=False,
    ) as bar:
        task = bar.add_task("migrate", total=max(m.total_bytes, 1), phase=m.phase, note="")
        while True:
            shown = max(shown, m.present_bytes)
            note = f"downtime {m.downtime_s * 1000:.0f} ms" if m.downtime_s is not None else ""
            if m.blocked_on:
                note = f"waiting for {m.blocked_on} {note}"
            bar.update(task, completed=shown, total=max(m.total_bytes, 1), phase=m.phase,
                       note=note)  # fmt: skip
            if m.final and m.settled:
                return m
            time.sleep(interval_s)
            m = c.get_migration(m.id)


def migrate(
    name: Annotated[str, typer.Argument(help="The domain to move.")],
    to: Annotated[str | None, typer.Option("--to", help="Target host.")] = None,
    watch_: Annotated[bool, typer.Option("--watch", help="Follow with a progress bar.")] = False,
    abort: Annotated[
        bool, typer.Option("--abort", help="Abort the domain's current migration.")
    ] = False,
    rate: Annotated[
        str | None, typer.Option("--rate", help="Background fill limit per second: 200M.")
    ] = None,
    mode: Annotated[
        str, typer.Option("--mode", help="post-copy (switch, then sync) or stop-and-copy.")
    ] = "post-copy",
    account: AccountOpt = None,
    as_json: JsonOpt = False,
    url: UrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """Move a running domain and its volume to another host (live, post-copy)."""
    if mode not in ("post-copy", "stop-and-copy"):
        fail(f"--mode must be post-copy or stop-and-copy, not {mode!r}")
    rate_bytes: int | None = None
    if rate is not None:
        try:
            rate_bytes = parse_size(rate)
        except ValueError as exc:
            fail(str(exc))
    with client(url, token) as c:
        if abort:
            current = c.domain_migration(name, account)
            m = c.abort_migration(current.id)
        else:
            if not to:
                fail("--to HOST is required (or --abort)")
            assert to is not None
            m = c.migrate_domain(
                name, to, mode=mode, rate_bytes_s=rate_bytes, account=account  # type: ignore[arg-type]
            )
        if watch_:
            m = watch(c, m) if not as_json else _poll(c, m)
        if as_json:
            emit_json(m)
        else:
            if not watch_:
                table(COLUMNS, [_row(m)])
            console.print(_summary(m))
    if watch_ and m.phase != "committed":
        raise typer.Exit(1)


def _poll(c: Client, m: MigrationInfo, interval_s: float = 0.2) -> MigrationInfo:
    while not (m.final and m.settled):
        time.sleep(interval_s)
        m = c.get_migration(m.id)
    return m


def migrations(
    account: AccountOpt = None,
    as_json: JsonOpt = False,
    url: UrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """List migrations (current and past)."""
    with client(url, token) as c:
        ms = c.list_migrations(account)
    if as_json:
        emit_json(ms)
        return
    table(COLUMNS, [_row(m) for m in ms])


domain_app.command("migrate")(migrate)
domain_app.command("migrations")(migrations)

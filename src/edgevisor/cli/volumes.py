"""``edgevisor volume create|list|show|rm|export|unexport`` (SDK only)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from edgevisor.cli.admin import JsonOpt, TokenOpt, UrlOpt, client
from edgevisor.cli.output import console, emit_json, table
from edgevisor.sdk.volumes import VolumeInfo

volume_app = typer.Typer(
    help="Volumes: block storage on a host, exported to one peer host.", no_args_is_help=True
)
AccountOpt = Annotated[
    str | None, typer.Option("--account", "-a", help="Account (admin token only).")
]
COLUMNS = ["name", "account", "host", "size", "block", "present", "exported to"]


def register(app: typer.Typer) -> None:
    app.add_typer(volume_app, name="volume")


def _human(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f}{unit}".replace(".0", "")
    return f"{n}B"


def _rows(vols: list[VolumeInfo]) -> list[list[Any]]:
    rows = []
    for v in vols:
        present = v.live.get("present_bytes") if v.live else None
        rows.append([
            v.name, v.account, v.host, _human(v.size_bytes), _human(v.block_size),
            _human(present) if present is not None else "-", v.exported_to,
        ])  # fmt: skip
    return rows


@volume_app.command("create")
def create(
    name: Annotated[str, typer.Argument(help="Volume name, unique in the account.")],
    size: Annotated[str, typer.Option("--size", help="e.g. 512M, 1G, 10G.")],
    host: Annotated[str | None, typer.Option("--host", help="Host (empty: chosen).")] = None,
    block_size: Annotated[
        int | None, typer.Option("--block-size", help="Bytes, a power of two.")
    ] = None,
    account: AccountOpt = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a zero-filled volume on a host."""
    with client(url, token) as c:
        info = c.create_volume(name, size, host=host, block_size=block_size, account=account)
    if as_json:
        emit_json(info)
    else:
        console.print(f"created volume {info.name} ({_human(info.size_bytes)}) on {info.host}")


@volume_app.command("list")
def list_(
    account: AccountOpt = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List volumes (the admin sees every account's)."""
    with client(url, token) as c:
        vols = c.list_volumes(account)
    if as_json:
        emit_json(vols)
    else:
        table(COLUMNS, _rows(vols))


@volume_app.command("show")
def show(
    name: str,
    account: AccountOpt = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """One volume, with what its host reports (present bytes, lazy progress, role)."""
    with client(url, token) as c:
        info = c.get_volume(name, account)
    if as_json:
        emit_json(info)
        return
    table(COLUMNS, _rows([info]))
    if info.live and info.live.get("lazy"):
        lz = info.live["lazy"]
        eta = lz.get("eta_s")
        console.print(
            f"filling from {lz['source']['host']}: {_human(lz['bytes_present'])} of "
            f"{_human(lz['bytes_total'])}, ETA {'-' if eta is None else f'{eta:.0f} s'}"
        )


@volume_app.command("rm")
def remove(
    name: str,
    account: AccountOpt = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """Delete a volume and its data (refused while it is mounted)."""
    with client(url, token) as c:
        c.remove_volume(name, account)
    console.print(f"removed volume {name}")


@volume_app.command("export")
def export(
    name: str,
    to: Annotated[str, typer.Option("--to", help="The only host allowed to open it.")],
    account: AccountOpt = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Export a volume over NBD (TLS, fleet certificates) to one peer host; prints the URI."""
    with client(url, token) as c:
        ep = c.export_volume(name, to, account)
    if as_json:
        emit_json(ep)
    else:
        typer.echo(ep.uri)


@volume_app.command("unexport")
def unexport(
    name: str,
    account: AccountOpt = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """Stop exporting a volume (open sessions of the peer are closed)."""
    with client(url, token) as c:
        c.unexport_volume(name, account)
    console.print(f"volume {name} is no longer exported")

"""``edgevisor network|address|record``: preserved logical addresses, through the SDK.

An address is named by its logical address (within the token's account) or its record id.
With the admin token, ``--account`` names the account.
"""

from __future__ import annotations

from typing import Annotated

import typer

from edgevisor.cli.admin import JsonOpt, TokenOpt, UrlOpt, client
from edgevisor.cli.output import console, emit_json, render, table
from edgevisor.sdk.addresses import AddressRecord, RecordStatus

__all__ = ["register"]

network_app = typer.Typer(help="Networks: an account's CIDRs of logical addresses.")
address_app = typer.Typer(help="Logical addresses: allocate, bind, preserve, claim, release.")
record_app = typer.Typer(help="Address records and what each host applied.")

AccountOpt = Annotated[
    str | None, typer.Option("--account", "-a", help="Account (admin token only).")
]
GenOpt = Annotated[
    int | None, typer.Option("--expect-generation", help="Refuse if the record changed.")
]
_ADDR_COLS = ["id", "logical", "state", "instance", "host", "physical", "generation"]


def register(app: typer.Typer) -> None:
    for sub in (network_app, address_app, record_app):
        sub.info.no_args_is_help = True
    app.add_typer(network_app, name="network")
    app.add_typer(address_app, name="address")
    app.add_typer(record_app, name="record")


def _ref(ref: str) -> str | int:
    return int(ref) if ref.isdigit() else ref


def _show(rec: AddressRecord | list[AddressRecord], as_json: bool) -> None:
    render(rec, as_json, _ADDR_COLS)


# --- networks ----------------------------------------------------------------------------


@network_app.command("create")
def network_create(
    name: str,
    cidr: str,
    account: AccountOpt = None,
    gateway: Annotated[str | None, typer.Option(
        "--gateway", help="`first`, an address, or `none`.")] = "first",
    url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False,
) -> None:
    """Create a network of logical addresses (CIDR) in an account."""
    gw = None if gateway in (None, "none") else gateway
    with client(url, token) as c:
        net = c.create_network(name, cidr, account=account, gateway=gw)
    render(net, as_json, ["name", "cidr", "gateway", "assignable"])


@network_app.command("list")
def network_list(
    account: AccountOpt = None, url: UrlOpt = None, token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List the account's networks."""
    with client(url, token) as c:
        nets = c.list_networks(account)
    render(nets, as_json, ["name", "cidr", "gateway", "size", "assignable"])


@network_app.command("rm")
def network_rm(
    name: str, account: AccountOpt = None, url: UrlOpt = None, token: TokenOpt = None
) -> None:
    """Delete a network that has no addresses left."""
    with client(url, token) as c:
        c.delete_network(name, account)
    console.print(f"network {name} deleted")


@network_app.command("pool-create")
def pool_create(
    cidr: str,
    host_group: Annotated[str, typer.Option("--host-group", help="Hosts using it.")] = "default",
    gateway: Annotated[str | None, typer.Option("--gateway")] = None,
    url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False,
) -> None:
    """Create the physical pool hosts use between them (admin; inside the hosts' subnet)."""
    with client(url, token) as c:
        pool = c.create_physical_pool(cidr, host_group, gateway)
    render(pool, as_json, ["host_group", "cidr", "assignable"])


@network_app.command("pool-list")
def pool_list(url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """List the physical pools (admin)."""
    with client(url, token) as c:
        pools = c.list_physical_pools()
    render(pools, as_json, ["host_group", "cidr", "family", "size", "assignable"])


# --- addresses ---------------------------------------------------------------------------


@address_app.command("allocate")
def address_allocate(
    network: Annotated[str, typer.Option("--network", "-n", help="Network to take it from.")],
    address: Annotated[str | None, typer.Argument(help="A specific address.")] = None,
    account: AccountOpt = None, url: UrlOpt = None, token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Allocate a free address (or a specific one) of a network."""
    with client(url, token) as c:
        _show(c.allocate_address(network, address, account=account), as_json)


@address_app.command("bind")
def address_bind(
    ref: Annotated[str, typer.Argument(help="Address or record id.")],
    instance: Annotated[str, typer.Option("--instance", "-i", help="Instance using it.")],
    host: Annotated[str, typer.Option("--host", help="Host the instance runs on.")],
    account: AccountOpt = None, expect: GenOpt = None, url: UrlOpt = None,
    token: TokenOpt = None, as_json: JsonOpt = False,
) -> None:
    """Give an allocated address to an instance on a host."""
    with client(url, token) as c:
        _show(c.bind_address(_ref(ref), instance, host, account=account,
                             expected_generation=expect), as_json)


@address_app.command("preserve")
def address_preserve(
    ref: Annotated[str, typer.Argument(help="Address or record id.")],
    account: AccountOpt = None, expect: GenOpt = None, url: UrlOpt = None,
    token: TokenOpt = None, as_json: JsonOpt = False,
) -> None:
    """Keep an address with its account when its instance stops."""
    with client(url, token) as c:
        _show(c.preserve_address(_ref(ref), account=account, expected_generation=expect),
              as_json)


@address_app.command("claim")
def address_claim(
    ref: Annotated[str, typer.Argument(help="Address or record id.")],
    instance: Annotated[str, typer.Option("--instance", "-i", help="Instance taking it.")],
    host: Annotated[str, typer.Option("--host", help="Host the instance runs on.")],
    account: AccountOpt = None, expect: GenOpt = None, url: UrlOpt = None,
    token: TokenOpt = None, as_json: JsonOpt = False,
) -> None:
    """Assign a preserved address to another instance of the same account."""
    with client(url, token) as c:
        _show(c.claim_address(_ref(ref), instance, host, account=account,
                              expected_generation=expect), as_json)


@address_app.command("release")
def address_release(
    ref: Annotated[str, typer.Argument(help="Address or record id.")],
    hold_down: Annotated[float | None, typer.Option(
        "--hold-down", help="Seconds before it can be reused (default: the setting).")] = None,
    account: AccountOpt = None, expect: GenOpt = None, url: UrlOpt = None,
    token: TokenOpt = None, as_json: JsonOpt = False,
) -> None:
    """Return an address to its network after the hold-down."""
    with client(url, token) as c:
        _show(c.release_address(_ref(ref), account=account, hold_down_s=hold_down,
                                expected_generation=expect), as_json)


@address_app.command("move")
def address_move(
    ref: Annotated[str, typer.Argument(help="Address or record id.")],
    host: Annotated[str, typer.Option("--host", help="The host taking over.")],
    account: AccountOpt = None, expect: GenOpt = None, url: UrlOpt = None,
    token: TokenOpt = None, as_json: JsonOpt = False,
) -> None:
    """Move a bound address to another host (new physical address); migrations use it."""
    with client(url, token) as c:
        _show(c.move_address(_ref(ref), host, account=account, expected_generation=expect),
              as_json)


@address_app.command("list")
def address_list(
    network: Annotated[str | None, typer.Option("--network", "-n")] = None,
    state: Annotated[str | None, typer.Option("--state")] = None,
    account: AccountOpt = None, url: UrlOpt = None, token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List the account's addresses."""
    with client(url, token) as c:
        _show(c.list_addresses(account, network, state), as_json)


@address_app.command("history")
def address_history(
    ref: Annotated[str, typer.Argument(help="Address or record id.")],
    account: AccountOpt = None, url: UrlOpt = None, token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Every transition of an address, oldest first (also after it was released)."""
    with client(url, token) as c:
        rows = c.address_history(_ref(ref), account)
    render(rows, as_json, ["at", "record_id", "event", "from_state", "to_state", "instance",
                           "host", "physical", "generation"])


# --- records -----------------------------------------------------------------------------


def _applied_text(st: RecordStatus) -> str:
    parts = []
    for a in st.applied:
        mark = "" if a.generation == st.record.generation else " (behind)"
        err = f" error: {a.error}" if a.error else ""
        parts.append(f"{a.host}={a.generation}{mark}{err}")
    return ", ".join(parts) or "-"


@record_app.command("list")
def record_list(
    host: Annotated[str | None, typer.Option("--host", help="Records on this host.")] = None,
    account: AccountOpt = None, url: UrlOpt = None, token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Records with the generation each host applied; hosts that lag are listed as drift."""
    with client(url, token) as c:
        rows = c.list_records(account, host)
    if as_json:
        emit_json(rows)
        return
    table(
        ["id", "account", "logical", "state", "host", "physical", "generation", "applied",
         "drift"],
        [[r.record.id, r.record.account, r.record.logical, r.record.state, r.record.host,
          r.record.physical, r.record.generation, _applied_text(r),
          ", ".join(r.drift) or "-"] for r in rows],
    )

"""The ``edgevisor`` command. Daemons (``up``, ``controller``, ``agent``) live here; the
commands that talk to a running controller use the SDK only (see :mod:`.admin`)."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from edgevisor.cli import addresses, admin, tasks
from edgevisor.cli import devices as devices_cli
from edgevisor.cli import domains as domains_cli
from edgevisor.cli import migrations as migrations_cli
from edgevisor.cli import volumes as volumes_cli
from edgevisor.cli.output import console, fail, table
from edgevisor.errors import ConfigError, Conflict, EdgevisorError, StoreUnavailable
from edgevisor.settings import Settings, describe, load_settings

app = typer.Typer(
    help="edgevisor: a self-hosted edge compute platform.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Inspect the effective settings.", no_args_is_help=True)
app.add_typer(config_app, name="config")
admin.register(app)
addresses.register(app)
tasks.register(app)
volumes_cli.register(app)
devices_cli.register(app)
domains_cli.register(app)
migrations_cli.register(app)

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="TOML settings file.", envvar=None)
]
DataDirOpt = Annotated[Path | None, typer.Option("--data-dir", help="State directory.")]


def _settings(config: Path | None, overrides: dict[str, Any]) -> Settings:
    try:
        return load_settings(config, overrides)
    except ConfigError as exc:
        fail(exc.message, code=2)
        raise  # unreachable; fail() exits


def _logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    # Per-request lines of the HTTP client and migration chatter are noise at info level.
    for noisy in ("httpx", "httpcore", "alembic", "amqtt", "transitions", "edgevisor.broker"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.root.level))


def isolation_warning() -> str | None:
    if os.geteuid() == 0:
        return None
    return (
        "running without root: tasks and domains run as plain subprocesses with rlimits only "
        "(no namespaces, no cgroup limits, no nftables address translation, no FUSE volumes). "
        "Run as root for isolation."
    )


def _loop_factory(settings: Settings) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if settings.event_loop == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return None


def _run_daemon(coro: Any, settings: Settings) -> None:
    try:
        with asyncio.Runner(loop_factory=_loop_factory(settings)) as runner:
            runner.run(coro)
    except (KeyboardInterrupt, asyncio.CancelledError):
        pass
    except (StoreUnavailable, ConfigError, Conflict) as exc:
        fail(exc.message, code=2)
    except OSError as exc:
        fail(f"cannot start: {exc}", code=2)


@app.command()
def up(
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    port: Annotated[int | None, typer.Option("--port", help="API port (7450).")] = None,
    host: Annotated[str | None, typer.Option("--host", help="This host's name.")] = None,
) -> None:
    """Run the controller and one agent in one process, on embedded defaults."""
    from edgevisor.agent.local import run_up

    settings = _settings(
        config,
        {"data_dir": data_dir, "controller.listen_port": port, "agent.host_name": host},
    )
    _logging(settings)
    if (warning := isolation_warning()) is not None:
        logging.getLogger("edgevisor").warning(warning)
    _run_daemon(run_up(settings), settings)


@app.command()
def controller(
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    port: Annotated[int | None, typer.Option("--port", help="API port.")] = None,
    listen: Annotated[str | None, typer.Option("--listen", help="API address.")] = None,
    store_url: Annotated[str | None, typer.Option("--store-url", help="Store URL.")] = None,
) -> None:
    """Run the controller alone (a fleet points its agents at it)."""
    from edgevisor.agent.local import run_controller

    settings = _settings(
        config,
        {
            "data_dir": data_dir,
            "controller.listen_port": port,
            "controller.listen_host": listen,
            "controller.store_url": store_url,
        },
    )
    _logging(settings)
    _run_daemon(run_controller(settings), settings)


@app.command()
def agent(
    controller_url: Annotated[
        str | None, typer.Option("--controller", help="Controller URL.")
    ] = None,
    host: Annotated[str | None, typer.Option("--host", help="This host's name.")] = None,
    join_token: Annotated[
        str | None, typer.Option("--join-token", help="One-time token for the first join.")
    ] = None,
    physical_address: Annotated[
        str | None, typer.Option("--physical-address", help="Address peers reach us at.")
    ] = None,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Run an agent on this host and join it to a controller."""
    from edgevisor.agent.local import run_agent

    settings = _settings(
        config,
        {
            "data_dir": data_dir,
            "agent.controller_url": controller_url,
            "agent.host_name": host,
            "agent.join_token": join_token,
            "agent.physical_address": physical_address,
        },
    )
    _logging(settings)
    if (warning := isolation_warning()) is not None:
        logging.getLogger("edgevisor").warning(warning)
    _run_daemon(run_agent(settings), settings)


@config_app.command("show")
def config_show(
    config: ConfigOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Print every setting's effective value with its help."""
    settings = _settings(config, {})
    rows = list(describe(settings))
    if as_json:
        from edgevisor.cli.output import emit_json

        emit_json({name: (str(v) if isinstance(v, Path) else v) for name, v, _ in rows})
        return
    table(["setting", "value", "help"], rows)
    console.print(
        "Set with a TOML file (--config or EDGEVISOR_CONFIG), or EDGEVISOR_<SECTION>__<FIELD>."
    )


def main() -> None:
    try:
        app()
    except EdgevisorError as exc:  # pragma: no cover - commands handle their own
        fail(exc.message)

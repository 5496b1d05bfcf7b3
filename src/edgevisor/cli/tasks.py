"""``edgevisor task ...``, ``edgevisor invoke`` and ``edgevisor call show`` (SDK only)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from edgevisor.cli.admin import JsonOpt, TokenOpt, UrlOpt, client
from edgevisor.cli.output import console, emit_json, fail, table
from edgevisor.sdk.tasks import CallInfo, TaskInfo

task_app = typer.Typer(help="Tasks: bundles of code deployed to hosts.", no_args_is_help=True)
call_app = typer.Typer(help="Calls of tasks.", no_args_is_help=True)
AccountOpt = Annotated[
    str | None, typer.Option("--account", "-a", help="Account (admin token only).")
]


def register(app: typer.Typer) -> None:
    app.add_typer(task_app, name="task")
    app.add_typer(call_app, name="call")
    app.command("invoke")(invoke)


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.1f} ms"


def _task_rows(tasks: list[TaskInfo]) -> list[list[Any]]:
    return [
        [
            t.name,
            t.account,
            t.version[:12],
            t.spec.get("runtime"),
            f"{t.spec.get('memory_mb')} MiB",
            t.spec.get("cpu"),
            f"{t.spec.get('timeout_s')} s",
            ",".join(t.hosts),
        ]
        for t in tasks
    ]


TASK_COLUMNS = ["name", "account", "version", "runtime", "memory", "cpu", "timeout", "hosts"]


@task_app.command("deploy")
def deploy(
    source: Annotated[Path, typer.Argument(help="Bundle directory, .tar.gz or .zip.")],
    name: Annotated[str | None, typer.Option("--name", help="Override the name.")] = None,
    memory: Annotated[str | None, typer.Option("--memory", help="e.g. 128M")] = None,
    cpu: Annotated[float | None, typer.Option("--cpu", help="Share of a core.")] = None,
    timeout: Annotated[str | None, typer.Option("--timeout", help="e.g. 3s")] = None,
    concurrency: Annotated[int | None, typer.Option("--concurrency")] = None,
    host: Annotated[list[str] | None, typer.Option("--host", help="Target host(s).")] = None,
    account: AccountOpt = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Deploy a task; a new version never breaks calls in flight on the old one."""
    if not source.exists():
        fail(f"{source}: no such directory or archive")
    with client(url, token) as c:
        info = c.deploy_task(
            source, account=account, name=name, memory=memory, cpu=cpu,
            timeout=timeout, concurrency=concurrency, hosts=host,
        )  # fmt: skip
    if as_json:
        emit_json(info)
    else:
        console.print(
            f"deployed {info.name} version {info.version[:12]} to {', '.join(info.hosts)}"
        )


@task_app.command("list")
def task_list(url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """Tasks this token can see."""
    with client(url, token) as c:
        tasks = c.list_tasks()
    if as_json:
        emit_json(tasks)
    else:
        table(TASK_COLUMNS, _task_rows(tasks))


@task_app.command("show")
def task_show(
    name: str,
    account: AccountOpt = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """One task with its effective manifest."""
    with client(url, token) as c:
        t = c.get_task(name, account)
    if as_json:
        emit_json(t)
        return
    table(TASK_COLUMNS, _task_rows([t]))
    console.print_json(json.dumps(t.spec))


@task_app.command("rm")
def task_rm(
    name: str, account: AccountOpt = None, url: UrlOpt = None, token: TokenOpt = None
) -> None:
    """Remove a task from every host; queued calls fail, running ones finish."""
    with client(url, token) as c:
        c.remove_task(name, account)
    console.print(f"task {name} removed")


def _event(data: str | None) -> Any:
    if data is None:
        return None
    try:
        if data == "@-":
            return json.load(sys.stdin)
        if data.startswith("@"):
            return json.loads(Path(data[1:]).read_text())
        return json.loads(data)
    except (OSError, ValueError) as exc:
        fail(f"--data is not valid JSON: {exc}")
    return None


def show_call(rec: CallInfo, as_json: bool) -> None:
    if as_json:
        emit_json(rec)
        return
    table(
        ["call", "task", "status", "queue wait", "init", "run"],
        [[rec.id, rec.task, rec.status, _ms(rec.queue_wait_s), _ms(rec.init_s), _ms(rec.run_s)]],
    )
    if rec.status == "succeeded":
        console.print_json(json.dumps(rec.result))
    elif rec.error:
        console.print(f"[red]{rec.error.get('type', 'error')}[/]: {rec.error.get('message', '')}")
        if rec.error.get("traceback"):
            console.print(rec.error["traceback"], highlight=False)
    if rec.logs:
        console.rule("logs")
        console.print(rec.logs, highlight=False, markup=False)


def invoke(
    name: str,
    data: Annotated[
        str | None, typer.Option("--data", "-d", help="Event JSON, @file or @- for stdin.")
    ] = None,
    async_: Annotated[bool, typer.Option("--async", help="Return a call id at once.")] = False,
    idempotency_key: Annotated[
        str | None, typer.Option("--idempotency-key", help="A retried call runs once.")
    ] = None,
    host: Annotated[str | None, typer.Option("--host", help="Run on this host.")] = None,
    priority: Annotated[int | None, typer.Option("--priority", help="-100..100")] = None,
    account: AccountOpt = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Call a task: prints its result (or error), timings and logs."""
    event = _event(data)
    opts = {"account": account, "host": host, "priority": priority,
            "idempotency_key": idempotency_key}  # fmt: skip
    with client(url, token) as c:
        if async_:
            accepted = c.invoke_async(name, event, **opts)
            if as_json:
                emit_json(accepted)
            else:
                console.print(accepted.id)
            return
        rec = c.invoke(name, event, **opts)
    show_call(rec, as_json)
    if rec.status != "succeeded":
        raise SystemExit(1)


@call_app.command("show")
def call_show(
    call_id: str,
    wait: Annotated[float | None, typer.Option("--wait", help="Wait up to N s.")] = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """A call's status, result or error, timings and logs."""
    with client(url, token) as c:
        show_call(c.get_call(call_id, wait), as_json)

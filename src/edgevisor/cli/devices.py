"""``edgevisor device|route|timer|shadow|deploy ...`` (SDK only)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from edgevisor.cli.admin import JsonOpt, TokenOpt, UrlOpt, client
from edgevisor.cli.output import console, emit_json, fail, table
from edgevisor.sdk.devices import DeploymentInfo, DeviceTLS, load_deployment_file

device_app = typer.Typer(help="Coordinated devices (MQTT clients).", no_args_is_help=True)
route_app = typer.Typer(help="Routes: device messages to tasks, topics, shadows.",
                        no_args_is_help=True)  # fmt: skip
timer_app = typer.Typer(help="Cron timers that call tasks.", no_args_is_help=True)
shadow_app = typer.Typer(help="Device shadows (desired/reported state).", no_args_is_help=True)
deploy_app = typer.Typer(help="Versioned deployments per host.", no_args_is_help=True)
AccountOpt = Annotated[
    str | None, typer.Option("--account", "-a", help="Account (admin token only).")
]
HostOpt = Annotated[str | None, typer.Option("--host", help="Target host (default: first up).")]


def register(app: typer.Typer) -> None:
    app.add_typer(device_app, name="device")
    app.add_typer(route_app, name="route")
    app.add_typer(timer_app, name="timer")
    app.add_typer(shadow_app, name="shadow")
    app.add_typer(deploy_app, name="deploy")


def _json_arg(text: str | None, what: str) -> Any:
    if text is None:
        return None
    if text.startswith("@"):
        text = Path(text[1:]).read_text()
    try:
        return json.loads(text)
    except ValueError as exc:
        fail(f"{what} is not JSON: {exc}")
        return None


# --- devices -------------------------------------------------------------------------------


@device_app.command("add")
def device_add(
    name: str,
    password: Annotated[str | None, typer.Option(help="Default: generated.")] = None,
    cert: Annotated[bool | None, typer.Option(
        "--cert/--no-cert",
        help="Issue a TLS client certificate (default: when the host's broker has TLS).",
    )] = None,
    out_dir: Annotated[Path, typer.Option(
        "--out", help="Where the certificate files go: NAME.key (0600), NAME.crt, ca.crt.",
    )] = Path("."),
    host: HostOpt = None, account: AccountOpt = None,
    url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False,
) -> None:  # fmt: skip
    """Register a device; prints its MQTT username and password (shown only once) and
    writes its client certificate and key to files when TLS is on."""
    with client(url, token) as c:
        d = c.add_device(name, password=password, host=host, account=account, cert=cert)
    files = _write_tls(d.tls, name, out_dir) if d.tls is not None else None
    if as_json:
        emit_json(d)
        return
    console.print(f"device {d.name} on host {d.host}")
    console.print(f"  broker:   {d.broker_url}")
    console.print(f"  username: {d.username}")
    console.print(f"  password: {d.password}   (shown only once)")
    console.print(f"  topics:   {d.topic_root}/#")
    if d.tls is not None and files is not None:
        key, crt, ca = files
        console.print(f"  tls:      {d.tls.url}")
        console.print(f"  key:      {key}   (0600; shown only once)")
        console.print(f"  cert:     {crt}")
        console.print(f"  ca:       {ca}")
        console.print(
            f"  try:      mosquitto_pub --cafile {ca} --cert {crt} --key {key} "
            f"-h HOST -p PORT -t {d.topic_root}/hello -m hi"
        )


def _write_tls(tls: DeviceTLS, name: str, out_dir: Path) -> tuple[Path | None, Path, Path]:
    """Write the key (when one came back), certificate and CA certificate, each 0600 from
    its first byte."""
    out_dir.mkdir(parents=True, exist_ok=True)
    key, crt, ca = out_dir / f"{name}.key", out_dir / f"{name}.crt", out_dir / "ca.crt"
    files = [(crt, tls.cert_pem), (ca, tls.ca_pem)]
    if tls.key_pem is not None:
        files.insert(0, (key, tls.key_pem))
    for path, text in files:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)  # an existing file keeps its mode otherwise
            os.write(fd, text.encode())
        finally:
            os.close(fd)
    return (key if tls.key_pem is not None else None), crt, ca


@device_app.command("list")
def device_list(
    account: AccountOpt = None, url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False
) -> None:
    with client(url, token) as c:
        devices = c.list_devices(account)
    if as_json:
        emit_json(devices)
    else:
        table(["name", "username", "host"], [[d.name, d.username, d.host] for d in devices])


@device_app.command("cert")
def device_cert(
    name: str,
    out_dir: Annotated[Path, typer.Option(
        "--out", help="Where the files go: NAME.key (0600), NAME.crt, ca.crt.",
    )] = Path("."),
    csr: Annotated[Path | None, typer.Option(
        "--csr", help="A PEM CSR made on the device (openssl req -new): the certificate is "
        "over the device's own key, which never leaves it; no key file is written.",
    )] = None,
    account: AccountOpt = None, url: UrlOpt = None, token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:  # fmt: skip
    """Issue a new TLS client certificate for a device; the previous one is revoked."""
    csr_pem = None
    if csr is not None:
        try:
            csr_pem = csr.read_text()
        except (OSError, UnicodeDecodeError) as e:
            fail(f"--csr {csr}: {e}")
    with client(url, token) as c:
        tls = c.issue_device_certificate(name, account, csr_pem)
    key, crt, ca = _write_tls(tls, name, out_dir)
    if as_json:
        emit_json(tls)
        return
    console.print(f"new certificate for {name} (serial {tls.serial}); the old one is revoked")
    where = f"key: {key} (0600)" if key is not None else f"key: the one behind {csr}"
    console.print(f"  {where}  cert: {crt}  ca: {ca}  broker: {tls.url}")


@device_app.command("rm")
def device_rm(
    name: str, account: AccountOpt = None, url: UrlOpt = None, token: TokenOpt = None
) -> None:
    with client(url, token) as c:
        c.remove_device(name, account)
    console.print(f"removed device {name}")


@device_app.command("stats")
def device_stats(
    host: Annotated[str, typer.Option("--host", help="The host.")],
    url: UrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """A host's device counters, broker refusals, ACL drops and spool losses (admin)."""
    with client(url, token) as c:
        emit_json(c.device_stats(host))


# --- routes --------------------------------------------------------------------------------


@route_app.command("add")
def route_add(
    name: str,
    topic: Annotated[str, typer.Option("--topic", help="MQTT topic filter (+, #).")],
    task: Annotated[str | None, typer.Option(help="Call this task.")] = None,
    reply: Annotated[str | None, typer.Option(help="Publish the task's result here.")] = None,
    to_topic: Annotated[str | None, typer.Option("--to-topic", help="Republish here.")] = None,
    to_shadow: Annotated[str | None, typer.Option("--to-shadow", help="Merge into DEVICE's "
                                                  "desired shadow.")] = None,
    to_controller: Annotated[bool, typer.Option("--to-controller")] = False,
    source_device: Annotated[str | None, typer.Option("--from-device")] = None,
    source_task: Annotated[str | None, typer.Option("--from-task")] = None,
    where: Annotated[str | None, typer.Option(help='JSON match, e.g. {"temp": {"gt": 30}}')] = None,
    host: HostOpt = None, account: AccountOpt = None,
    url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False,
) -> None:  # fmt: skip
    """Add a route: messages on TOPIC go to a task, a topic, a shadow or the controller."""
    chosen = [x for x in (task, to_topic, to_shadow) if x] + (["c"] if to_controller else [])
    if len(chosen) != 1:
        fail("name exactly one destination: --task, --to-topic, --to-shadow or --to-controller")
    dest: dict[str, Any]
    if task:
        dest = {"kind": "task", "task": task, "reply_topic": reply}
    elif to_topic:
        dest = {"kind": "topic", "topic": to_topic}
    elif to_shadow:
        dest = {"kind": "shadow", "device": to_shadow, "section": "desired"}
    else:
        dest = {"kind": "controller"}
    route = {"name": name, "topic_filter": topic, "destination": dest,
             "source_device": source_device, "source_task": source_task,
             "where": _json_arg(where, "--where")}  # fmt: skip
    with client(url, token) as c:
        r = c.add_route(route, host=host, account=account)
    if as_json:
        emit_json(r)
    else:
        console.print(f"route {r.name} on host {r.host}: {r.topic_filter} -> {r.destination}")


@route_app.command("list")
def route_list(
    account: AccountOpt = None, url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False
) -> None:
    with client(url, token) as c:
        routes = c.list_routes(account)
    if as_json:
        emit_json(routes)
        return
    rows = [[r.name, r.topic_filter, r.source_device or r.source_task or "-",
             json.dumps(r.destination), r.host] for r in routes]  # fmt: skip
    table(["name", "filter", "source", "destination", "host"], rows)


@route_app.command("rm")
def route_rm(
    name: str, account: AccountOpt = None, url: UrlOpt = None, token: TokenOpt = None
) -> None:
    with client(url, token) as c:
        c.remove_route(name, account)
    console.print(f"removed route {name}")


# --- timers --------------------------------------------------------------------------------


@timer_app.command("add")
def timer_add(
    name: str,
    cron: Annotated[str, typer.Option(help="Cron expression (UTC), e.g. '*/5 * * * *'.")],
    task: Annotated[str, typer.Option(help="The task to call.")],
    event: Annotated[str | None, typer.Option(help="JSON event payload or @file.")] = None,
    missed: Annotated[str, typer.Option(help="skip | run-once | run-all")] = "skip",
    host: HostOpt = None, account: AccountOpt = None,
    url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False,
) -> None:  # fmt: skip
    timer = {"name": name, "cron": cron, "task": task, "event": _json_arg(event, "--event") or {},
             "missed": missed}  # fmt: skip
    with client(url, token) as c:
        t = c.add_timer(timer, host=host, account=account)
    if as_json:
        emit_json(t)
    else:
        console.print(f"timer {t.name} on host {t.host}: {t.cron} -> {t.task}")


@timer_app.command("list")
def timer_list(
    account: AccountOpt = None, url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False
) -> None:
    with client(url, token) as c:
        timers = c.list_timers(account)
    if as_json:
        emit_json(timers)
        return
    table(["name", "cron", "task", "missed", "next run", "host"],
          [[t.name, t.cron, t.task, t.missed, t.next_run, t.host] for t in timers])  # fmt: skip


@timer_app.command("rm")
def timer_rm(
    name: str, account: AccountOpt = None, url: UrlOpt = None, token: TokenOpt = None
) -> None:
    with client(url, token) as c:
        c.remove_timer(name, account)
    console.print(f"removed timer {name}")


# --- shadows -------------------------------------------------------------------------------


@shadow_app.command("get")
def shadow_get(
    device: str, account: AccountOpt = None, url: UrlOpt = None, token: TokenOpt = None
) -> None:
    """Print the shadow document as JSON."""
    with client(url, token) as c:
        emit_json(c.get_shadow(device, account))


@shadow_app.command("update")
def shadow_update(
    device: str,
    desired: Annotated[str | None, typer.Option(help="JSON patch of desired, or @file.")] = None,
    reported: Annotated[str | None, typer.Option(help="JSON patch of reported.")] = None,
    version: Annotated[int | None, typer.Option(help="Fail if not the current version.")] = None,
    account: AccountOpt = None, url: UrlOpt = None, token: TokenOpt = None,
) -> None:  # fmt: skip
    with client(url, token) as c:
        emit_json(c.update_shadow(
            device, desired=_json_arg(desired, "--desired"),
            reported=_json_arg(reported, "--reported"), version=version, account=account,
        ))  # fmt: skip


# --- deployments ---------------------------------------------------------------------------


def _show(deps: list[DeploymentInfo], as_json: bool) -> None:
    if as_json:
        emit_json(deps)
        return
    rows = [[d.host, d.version, d.state, d.failed_step or "-", d.error or "-",
             ", ".join(f"{s.name}:{s.state}" for s in d.steps)] for d in deps]  # fmt: skip
    table(["host", "version", "state", "failed step", "error", "steps"], rows)


@deploy_app.command("apply")
def deploy_apply(
    file: Annotated[Path, typer.Argument(help="Deployment TOML (tasks, devices, routes, ...).")],
    wait: Annotated[float, typer.Option(help="Seconds to wait for the result; 0: no wait.")] = 60,
    account: AccountOpt = None, url: UrlOpt = None, token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:  # fmt: skip
    """Create the next version for each target host and (by default) wait for its result."""
    import time

    spec = load_deployment_file(file)
    with client(url, token) as c:
        deps = c.apply_deployment(spec, account)
        deadline = time.monotonic() + wait
        wanted = {(d.host, d.version) for d in deps}
        while wait > 0 and time.monotonic() < deadline:
            deps = [d for d in c.deployment_status(account=account, history=True)
                    if (d.host, d.version) in wanted]  # fmt: skip
            if all(d.state not in ("pending", "applying") for d in deps):
                break
            time.sleep(0.5)
    _show(deps, as_json)
    if any(d.state in ("failed", "cancelled") for d in deps):
        raise typer.Exit(1)


@deploy_app.command("status")
def deploy_status(
    host: HostOpt = None,
    history: Annotated[bool, typer.Option(help="Every version.")] = False,
    account: AccountOpt = None, url: UrlOpt = None, token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:  # fmt: skip
    with client(url, token) as c:
        _show(c.deployment_status(host, account, history), as_json)


@deploy_app.command("cancel")
def deploy_cancel(
    host: HostOpt = None, account: AccountOpt = None, url: UrlOpt = None,
    token: TokenOpt = None, as_json: JsonOpt = False,
) -> None:  # fmt: skip
    """Cancel pending or applying versions; the host rolls back to its last good version."""
    with client(url, token) as c:
        _show(c.cancel_deployment(host, account), as_json)

"""MQTT over TLS with client certificates, against the real mosquitto command-line clients:
a device with its certificate publishes and its route fires; no certificate, a certificate
of another CA, a removed device's or a replaced certificate are refused; an external
broker given as ``mqtts://`` is reached over TLS."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from devices_mqtt_helpers import free_port, wait_for

from edgevisor.devices.routes import Route, ToTask
from edgevisor.devices.tls import DeviceCertificate, DevicesTLS

Make = Callable[..., Awaitable[Any]]  # conftest.make_service -> Harness


def _files(tmp: Path, cert: DeviceCertificate, tag: str) -> list[str]:
    """mosquitto client TLS arguments for ``cert`` (files written 0600)."""
    d = tmp / f"certs-{tag}"
    d.mkdir(parents=True, exist_ok=True)
    for name, text in (("ca.crt", cert.ca_pem), ("dev.crt", cert.cert_pem),
                       ("dev.key", cert.key_pem)):  # fmt: skip
        (d / name).write_text(text)
        (d / name).chmod(0o600)
    return ["--cafile", str(d / "ca.crt"), "--cert", str(d / "dev.crt"),
            "--key", str(d / "dev.key")]  # fmt: skip


async def _run(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def tls_pub(port: int, tls_args: list[str], topic: str, message: str) -> tuple[int, str]:
    return await _run("mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), *tls_args,
                      "-t", topic, "-m", message)  # fmt: skip


@contextlib.asynccontextmanager
async def tls_sub(port: int, tls_args: list[str], topic: str) -> AsyncIterator[Any]:
    args = ["stdbuf", "-oL", "mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-d", "-v",
            *tls_args, "-t", topic]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    lines: list[str] = []
    assert proc.stdout is not None
    try:
        while True:
            raw = await asyncio.wait_for(proc.stdout.readline(), 30)
            if not raw:
                raise AssertionError("mosquitto_sub exited before SUBACK")
            if raw.startswith(b"Subscribed"):
                assert raw.decode().rstrip().endswith("0"), raw
                break

        async def pump() -> None:
            assert proc.stdout is not None
            async for raw in proc.stdout:
                line = raw.decode().rstrip("\n")
                if not line.startswith("Client ") and not line.startswith("Subscribed"):
                    lines.append(line)

        task = asyncio.create_task(pump())
        try:
            yield proc, lines
        finally:
            task.cancel()
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def _tls_service(make_service: Make) -> Any:
    return await make_service(settings_extra={"tls_port": free_port()})


async def test_devices_tls_device_publishes_and_route_fires(
    make_service: Make, tmp_path: Path
) -> None:
    h = await _tls_service(make_service)
    svc = h.svc
    assert svc.broker_tls_url is not None and svc.broker_tls_url.startswith("mqtts://")
    tls_port = svc.broker.tls_port
    svc.add_device("d1", "pw1")
    cert = svc.issue_certificate("d1")
    args = _files(tmp_path, cert, "d1")
    await svc.add_route(Route("temp", "devices/+/temp", ToTask("thermo", "devices/d1/reply")))
    async with tls_sub(tls_port, args, "devices/d1/reply") as (_, lines):
        rc, out = await tls_pub(tls_port, args, "devices/d1/temp", '{"temp": 7}')
        assert rc == 0, out
        await wait_for(lambda: len(lines) >= 1)
    topic, payload = lines[0].split(" ", 1)
    assert topic == "devices/d1/reply"
    assert json.loads(payload) == {"task": "thermo", "got": {"temp": 7}}
    # The certificate's CN became the username: the route saw d1 as the source.
    assert h.calls == [
        ("thermo", {"topic": "devices/d1/temp", "source": "d1", "payload": {"temp": 7}})
    ]
    # The ACL applies as for a password login: d1 cannot publish as d2.
    svc.add_device("d2", "pw2")
    rc, _ = await tls_pub(tls_port, args, "devices/d2/temp", '{"temp": 9}')
    assert rc == 0  # MQTT 3.1.1 drops, it cannot refuse
    await wait_for(lambda: svc.stats()["broker"]["publishes_dropped"].get("d1") == 1)
    assert len(h.calls) == 1


async def test_devices_tls_refuses_bad_certificates(make_service: Make, tmp_path: Path) -> None:
    h = await _tls_service(make_service)
    svc = h.svc
    tls_port = svc.broker.tls_port
    svc.add_device("d1", "pw1")
    good = svc.issue_certificate("d1")
    good_args = _files(tmp_path, good, "good")
    ca_only = ["--cafile", good_args[1]]

    # No client certificate: the handshake fails (the broker requires one).
    rc, out = await tls_pub(tls_port, ca_only, "devices/d1/x", "1")
    assert rc != 0, out
    # Username and password over TLS without a certificate: still refused.
    rc, out = await tls_pub(tls_port, [*ca_only, "-u", "d1", "-P", "pw1"], "devices/d1/x", "1")
    assert rc != 0, out

    # A certificate for the same CN from another CA: refused in the handshake.
    other = DevicesTLS.load_or_create(tmp_path / "other-ca").issue_device("d1")
    bad_args = _files(tmp_path, other, "other")
    bad_args[1] = good_args[1]  # trust the real broker, present the foreign certificate
    rc, out = await tls_pub(tls_port, bad_args, "devices/d1/x", "1")
    assert rc != 0, out

    # A certificate for a username that is not the CN: refused.
    rc, out = await tls_pub(tls_port, [*good_args, "-u", "d2"], "devices/d1/x", "1")
    assert rc != 0 and "not authorised" in out, out

    # Reissued: the old certificate is revoked, the new one works.
    new = svc.issue_certificate("d1")
    rc, out = await tls_pub(tls_port, good_args, "devices/d1/x", "1")
    assert rc != 0 and "not authorised" in out, out
    assert svc.registry.is_revoked(good.serial)
    new_args = _files(tmp_path, new, "new")
    rc, out = await tls_pub(tls_port, new_args, "devices/d1/x", "1")
    assert rc == 0, out

    # Removed while connected: the connection is closed, and the certificate is refused
    # afterwards, also once a device of the same name is registered again.
    async with tls_sub(tls_port, new_args, "devices/d1/#") as (proc, _):
        svc.remove_device("d1")
        await asyncio.wait_for(proc.wait(), 30)
    rc, out = await tls_pub(tls_port, new_args, "devices/d1/x", "1")
    assert rc != 0 and "not authorised" in out, out
    svc.add_device("d1", "pw1")
    rc, out = await tls_pub(tls_port, new_args, "devices/d1/x", "1")
    assert rc != 0 and "not authorised" in out, out
    assert svc.registry.is_revoked(new.serial)
    assert svc.stats()["broker"]["connections_refused"] >= 4


async def test_devices_tls_server_certificate_names_loopback(
    make_service: Make,
) -> None:
    """A client that checks the host name (as mosquitto does) accepts the broker at
    127.0.0.1 and localhost with the CA the device was given."""
    h = await _tls_service(make_service)
    svc = h.svc
    svc.add_device("d1", "pw1")
    cert = svc.issue_certificate("d1")
    ctx = ssl.create_default_context(cadata=cert.ca_pem)
    for name in ("127.0.0.1", "localhost"):
        # No client certificate: the handshake is refused by the broker, but only after
        # the server certificate passed our checks (a bad one fails with a verify error).
        try:
            _, w = await asyncio.open_connection(
                "127.0.0.1", svc.broker.tls_port, ssl=ctx, server_hostname=name
            )
            w.close()
        except ssl.SSLCertVerificationError as exc:
            raise AssertionError(f"broker certificate rejected for {name}: {exc}") from exc
        except (ssl.SSLError, ConnectionError):
            pass


async def test_devices_tls_external_mqtts_broker(make_service: Make, tmp_path: Path) -> None:
    """The agent connects to an external mosquitto over TLS with a client certificate."""
    ca = DevicesTLS.load_or_create(tmp_path / "ext-ca")
    agent = ca.issue_device("agent")
    d = tmp_path / "ext"
    d.mkdir()
    (d / "agent.crt").write_text(agent.cert_pem)
    (d / "agent.key").write_text(agent.key_pem)
    (d / "agent.key").chmod(0o600)
    (d / "ca.crt").write_text(agent.ca_pem)
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    # "user root": mosquitto started as root otherwise drops to user mosquitto, which
    # cannot read the test's private tmp dir.
    conf.write_text(
        f"user root\nlistener {port} 127.0.0.1\nallow_anonymous true\n"
        f"cafile {ca.ca_path}\ncertfile {ca.cert_path}\nkeyfile {ca.key_path}\n"
        "require_certificate true\n"
    )
    proc = await asyncio.create_subprocess_exec(
        "mosquitto", "-c", str(conf), stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    dev = ca.issue_device("d1")
    dev_args = _files(tmp_path, dev, "ext-d1")
    try:
        for _ in range(300):
            if (await tls_pub(port, dev_args, "probe", "1"))[0] == 0:
                break
            await asyncio.sleep(0.05)
        h = await make_service(
            external_url=f"mqtts://127.0.0.1:{port}",
            settings_extra={
                "external_broker_cafile": d / "ca.crt",
                "external_broker_certfile": d / "agent.crt",
                "external_broker_keyfile": d / "agent.key",
            },
        )
        assert h.svc.broker is None
        h.svc.add_device("d1", "pw1")
        await h.svc.add_route(Route("temp", "devices/+/temp", ToTask("t", "devices/d1/reply")))
        async with tls_sub(port, dev_args, "devices/d1/reply") as (_, lines):
            rc, out = await tls_pub(port, dev_args, "devices/d1/temp", '{"temp": 2}')
            assert rc == 0, out
            await wait_for(lambda: len(lines) >= 1)
        assert json.loads(lines[0].split(" ", 1)[1]) == {"task": "t", "got": {"temp": 2}}
    finally:
        proc.kill()
        await proc.wait()

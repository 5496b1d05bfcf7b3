"""TLS as a new user meets it: ``edgevisor device add NAME`` on a host whose broker has TLS
writes the device's key (0600), certificate and CA; ``mosquitto_pub``/``mosquitto_sub``
with those files reach the broker's TLS port, the route calls the task and the reply
arrives; ``device cert`` replaces the certificate and ``device rm`` revokes it."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from devices_wired_helpers import ECHO_TASK, Fleet, bundle, fleet, wait_until

from edgevisor.testing.controller import free_port


@pytest.fixture
def f(tmp_path: Path) -> Iterator[Fleet]:
    with fleet(tmp_path, {"devices.tls_port": free_port()}) as fl:
        yield fl


def _cli(f: Fleet, token: str, *args: str) -> subprocess.CompletedProcess[str]:
    exe = str(Path(sys.executable).parent / "edgevisor")
    return subprocess.run([exe, *args, "--url", f.ctl.url, "--token", token],
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def _tls(port: int, d: Path, name: str) -> list[str]:
    return ["-h", "127.0.0.1", "-p", str(port), "--cafile", str(d / "ca.crt"),
            "--cert", str(d / f"{name}.crt"), "--key", str(d / f"{name}.key")]  # fmt: skip


def test_device_add_with_certificate_over_tls(f: Fleet, tmp_path: Path) -> None:
    acme = f.account_client("acme")
    token = acme.token or ""
    acme.deploy_task(bundle(ECHO_TASK), timeout="60s")  # a loaded machine is no failure
    out_dir = tmp_path / "s1-certs"
    res = _cli(f, token, "device", "add", "s1", "--out", str(out_dir), "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    info = json.loads(res.stdout)
    tls_url = info["tls"]["url"]
    assert tls_url.startswith("mqtts://127.0.0.1:")
    port = int(tls_url.rsplit(":", 1)[1])
    for name in ("s1.key", "s1.crt", "ca.crt"):
        assert (out_dir / name).stat().st_mode & 0o777 == 0o600
    acme.add_route({"name": "r1", "topic_filter": "devices/acme.s1/in", "source_device": "s1",
                    "destination": {"kind": "task", "task": "echo",
                                    "reply_topic": "devices/acme.s1/out"}})  # fmt: skip
    args = _tls(port, out_dir, "s1")
    sub = subprocess.Popen(
        ["stdbuf", "-oL", "mosquitto_sub", *args, "-t", "devices/acme.s1/out", "-C", "1", "-d"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert sub.stdout is not None
        lines: list[str] = []
        while not any(x.startswith("Subscribed") for x in lines):
            line = sub.stdout.readline()
            assert line, "".join(lines)
            lines.append(line)
        pub = subprocess.run(
            ["mosquitto_pub", *args, "-t", "devices/acme.s1/in", "-m", '{"t": 1}'],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert pub.returncode == 0, pub.stderr
        rest, _ = sub.communicate(timeout=60)
    finally:
        if sub.poll() is None:
            sub.kill()
            sub.wait()
    payload = [x for x in rest.splitlines() if x.startswith("{")]
    assert payload, rest
    assert json.loads(payload[0]) == {"echo": {"t": 1}, "source": "acme.s1"}

    # A new certificate: the files are replaced, the old certificate no longer logs in.
    old = (out_dir / "s1.crt").read_text(), (out_dir / "s1.key").read_text()
    res = _cli(f, token, "device", "cert", "s1", "--out", str(tmp_path / "new"))
    assert res.returncode == 0, res.stdout + res.stderr
    old_dir = tmp_path / "old"
    old_dir.mkdir()
    (old_dir / "s1.crt").write_text(old[0])
    (old_dir / "s1.key").write_text(old[1])
    (old_dir / "ca.crt").write_text((out_dir / "ca.crt").read_text())

    def pub_ok(d: Path) -> bool:
        r = subprocess.run(["mosquitto_pub", *_tls(port, d, "s1"), "-t", "devices/acme.s1/x",
                            "-m", "1"], capture_output=True, text=True, timeout=60)  # fmt: skip
        return r.returncode == 0

    assert not pub_ok(old_dir)
    assert pub_ok(tmp_path / "new")
    # Removed: its certificate is refused.
    res = _cli(f, token, "device", "rm", "s1")
    assert res.returncode == 0, res.stderr
    wait_until(lambda: not pub_ok(tmp_path / "new"), 30, "certificate refused after rm")


def test_device_cert_from_its_own_csr(f: Fleet, tmp_path: Path) -> None:
    """A device that makes its own key sends only a CSR: the certificate is over that key,
    its CN is the device's username whatever the CSR asks for, no key file is written, and
    a CSR that cannot be used is refused with nothing revoked."""
    acme = f.account_client("acme")
    token = acme.token or ""
    first = tmp_path / "first"
    res = _cli(f, token, "device", "add", "s2", "--out", str(first), "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    port = int(json.loads(res.stdout)["tls"]["url"].rsplit(":", 1)[1])
    dev = tmp_path / "on-device"
    dev.mkdir()
    made = subprocess.run(
        ["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", str(dev / "s2.key"), "-out", str(dev / "s2.csr"),
         "-subj", "/CN=someone-else"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    key_before = (dev / "s2.key").read_bytes()

    def pub_ok(d: Path) -> bool:
        r = subprocess.run(["mosquitto_pub", *_tls(port, d, "s2"), "-t", "devices/acme.s2/x",
                            "-m", "1"], capture_output=True, text=True, timeout=60)  # fmt: skip
        return r.returncode == 0

    # Unusable CSRs: refused with the reason; the certificate the device has still works.
    (dev / "bad.csr").write_text("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n")
    res = _cli(f, token, "device", "cert", "s2", "--csr", str(dev / "bad.csr"), "--out", str(dev))
    assert res.returncode != 0
    assert "certificate signing request" in res.stdout + res.stderr
    assert not (dev / "s2.crt").exists()
    assert pub_ok(first)

    res = _cli(f, token, "device", "cert", "s2", "--csr", str(dev / "s2.csr"), "--out", str(dev),
               "--json")  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    out = json.loads(res.stdout)
    assert out["key_pem"] is None
    assert (dev / "s2.key").read_bytes() == key_before  # the device's key is untouched
    subject = subprocess.run(
        ["openssl", "x509", "-noout", "-subject", "-in", str(dev / "s2.crt")],
        capture_output=True, text=True, timeout=60,
    ).stdout  # fmt: skip
    assert "CN = acme.s2" in subject, subject
    assert "someone-else" not in subject
    pubkeys = [
        subprocess.run(["openssl", kind, "-noout", "-pubkey", "-in", str(path)],
                       capture_output=True, text=True, timeout=60).stdout
        for kind, path in (("x509", dev / "s2.crt"), ("req", dev / "s2.csr"))
    ]  # fmt: skip
    assert pubkeys[0] and pubkeys[0] == pubkeys[1]  # over the device's own public key
    assert pub_ok(dev)
    assert not pub_ok(first)  # the certificate it replaced is revoked

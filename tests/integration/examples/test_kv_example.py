"""The kv example domain's service (examples/domains/kv/kv.py) as a process on loopback:
its HTTP surface, durability of acknowledged writes, and the replay of its log."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

KV = Path(__file__).resolve().parents[3] / "examples" / "domains" / "kv" / "kv.py"


class Kv:
    def __init__(self, data: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-S", str(KV), "--port", "0", "--data", str(data)],
            stdout=subprocess.PIPE, text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("kv: serving on :"), line
        self.port = int(line.split(":")[2].split()[0])

    def conn(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)

    def call(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        c = self.conn()
        try:
            c.request(method, path, body=body)
            r = c.getresponse()
            return r.status, r.read()
        finally:
            c.close()

    def stop(self) -> None:
        self.proc.kill()  # as a migration's quiesce does: no clean shutdown
        self.proc.wait(timeout=10)


@pytest.fixture
def kv(tmp_path: Path) -> Iterator[Kv]:
    k = Kv(tmp_path)
    try:
        yield k
    finally:
        k.stop()


def raw(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def test_kv_put_get_list_and_health(kv: Kv) -> None:
    assert kv.call("PUT", "/kv/a", b"one") == (204, b"")
    assert kv.call("PUT", "/kv/a%20b%C3%A9", "två".encode()) == (204, b"")
    assert kv.call("GET", "/kv/a") == (200, b"one")
    assert kv.call("GET", "/kv/a b\u00e9".replace(" ", "%20").replace("\u00e9", "%C3%A9")) == (
        200, "två".encode())
    assert json.loads(kv.call("GET", "/kv")[1]) == {"a": "one", "a b\u00e9": "två"}
    assert json.loads(kv.call("GET", "/healthz")[1]) == {"ok": True, "keys": 2, "writes": 2}
    assert kv.call("GET", "/kv/missing")[0] == 404
    assert kv.call("GET", "/elsewhere")[0] == 404
    assert kv.call("DELETE", "/kv/a")[0] == 405


def test_kv_keeps_connections_alive(kv: Kv) -> None:
    c = kv.conn()
    try:
        for i in range(5):
            c.request("PUT", f"/kv/k{i}", body=str(i).encode())
            r = c.getresponse()
            assert (r.status, r.read()) == (204, b"")
        c.request("GET", "/kv/k3")
        r = c.getresponse()
        assert (r.status, r.read()) == (200, b"3")
        assert c.sock is not None  # the same connection served all of them
    finally:
        c.close()


def test_kv_refuses_bad_requests_with_a_reason(kv: Kv) -> None:
    too_big = raw(kv.port, b"PUT /kv/x HTTP/1.1\r\ncontent-length: 2000000\r\n\r\n")
    assert too_big.startswith(b"HTTP/1.1 413 ") and b"too large" in too_big
    chunked = raw(kv.port, b"PUT /kv/x HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n")
    assert chunked.startswith(b"HTTP/1.1 411 ")
    assert raw(kv.port, b"NONSENSE\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert raw(kv.port, b"GET / HTTP/1.1\r\nno colon\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    bad_len = raw(kv.port, b"PUT /kv/x HTTP/1.1\r\ncontent-length: -1\r\n\r\n")
    assert bad_len.startswith(b"HTTP/1.1 400 ")
    not_utf8 = raw(kv.port, b"PUT /kv/x HTTP/1.1\r\ncontent-length: 1\r\nconnection: close"
                            b"\r\n\r\n\xff")
    assert not_utf8.startswith(b"HTTP/1.1 400 ")
    # Nothing of it was stored, and the service still serves.
    assert json.loads(kv.call("GET", "/healthz")[1]) == {"ok": True, "keys": 0, "writes": 0}


def test_kv_replays_acknowledged_writes_and_drops_a_torn_tail(tmp_path: Path) -> None:
    k = Kv(tmp_path)
    try:
        for i in range(20):
            assert k.call("PUT", f"/kv/k{i}", f"v{i}".encode())[0] == 204
    finally:
        k.stop()
    with open(tmp_path / "kv.log", "ab") as fh:
        fh.write(b'{"k": "torn", "v": "nev')  # a write cut short: never acknowledged
    k = Kv(tmp_path)
    try:
        snapshot = json.loads(k.call("GET", "/kv")[1])
        assert snapshot == {f"k{i}": f"v{i}" for i in range(20)}
        assert k.call("PUT", "/kv/after", b"x")[0] == 204
    finally:
        k.stop()
    lines = (tmp_path / "kv.log").read_bytes().splitlines()
    assert len(lines) == 21 and json.loads(lines[-1]) == {"k": "after", "v": "x"}


def test_kv_refuses_unknown_arguments(tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, "-I", "-S", str(KV), "--bogus"], capture_output=True,
                       text=True, timeout=30, env=os.environ | {"EDGEVISOR_DATA": str(tmp_path)})
    assert p.returncode != 0 and "unknown argument" in p.stderr

"""A small key-value HTTP service that keeps its data on its volume (the example domain).

    GET  /healthz        {"ok": true, "keys": N, "writes": N}
    GET  /kv/KEY         the value (200) or 404
    PUT  /kv/KEY         body = value; 204 once the write is durable (fsync'd)
    GET  /kv             {"KEY": "VALUE", ...}

Data: an append-only log ``<data>/kv.log``, one JSON line per write, fsync'd before the
write is acknowledged; replayed at start (a torn last line is dropped). Standard library
only, so it runs with ``python -I -S`` inside a domain.

HTTP/1.1 with kept-alive connections, a thread per connection. It speaks just what it
serves, on ``socket`` directly: ``http.server`` would be simpler, but importing it (with
``email`` and ``http.client``) takes ~45 ms, a third of a migration's downtime (the
service's start-up is part of it); this imports in ~13 ms.

Usage: ``python kv.py [--port 8080] [--data $EDGEVISOR_DATA or /data]``
"""

from __future__ import annotations

import io
import json
import os
import socket
import sys
import threading

MAX_VALUE = 1 << 20
MAX_LINE = 8 << 10  # request line or one header
MAX_HEADERS = 100
_HEX = frozenset("0123456789abcdefABCDEF")
_REASONS = {200: "OK", 204: "No Content", 400: "Bad Request", 404: "Not Found",
            405: "Method Not Allowed", 411: "Length Required", 413: "Content Too Large",
            431: "Request Header Fields Too Large"}
JSON = "application/json"


class Store:
    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, "kv.log")
        self.data: dict[str, str] = {}
        self.writes = 0
        self.lock = threading.Lock()
        good = 0
        if os.path.exists(self.path):
            with open(self.path, "rb") as fh:
                for line in fh:
                    if not line.endswith(b"\n"):
                        break  # torn last write: never acknowledged
                    try:
                        rec = json.loads(line)
                    except ValueError:
                        break
                    self.data[rec["k"]] = rec["v"]
                    good += len(line)
            os.truncate(self.path, good)
        self.fh = open(self.path, "ab")  # noqa: SIM115 - lives as long as the service

    def put(self, key: str, value: str) -> None:
        line = json.dumps({"k": key, "v": value}).encode() + b"\n"
        with self.lock:
            self.fh.write(line)
            self.fh.flush()
            os.fsync(self.fh.fileno())
            self.data[key] = value
            self.writes += 1


def unquote(text: str) -> str:
    """Percent-decoding of a path (UTF-8), as ``urllib.parse.unquote`` (not imported: its
    import costs more than this)."""
    if "%" not in text:
        return text
    head, *rest = text.split("%")
    out = bytearray(head.encode())
    for part in rest:
        if len(part) >= 2 and part[0] in _HEX and part[1] in _HEX:
            out.append(int(part[:2], 16))
            out += part[2:].encode()
        else:
            out += b"%" + part.encode()
    return out.decode("utf-8", "replace")


class HttpError(Exception):
    """A request this service refuses; the connection is closed after the answer."""

    def __init__(self, code: int, why: str) -> None:
        super().__init__(why)
        self.code = code


def answer(method: str, path: str, body: bytes, store: Store) -> tuple[int, str, bytes]:
    """(status, content type, body) of one request."""
    if method == "GET":
        if path == "/healthz":
            health = {"ok": True, "keys": len(store.data), "writes": store.writes}
            return 200, JSON, json.dumps(health).encode()
        if path == "/kv":
            with store.lock:
                snapshot = dict(store.data)
            return 200, JSON, json.dumps(snapshot).encode()
        if path.startswith("/kv/"):
            value = store.data.get(unquote(path[4:]))
            if value is None:
                return 404, JSON, b'{"error": "no such key"}'
            return 200, "text/plain; charset=utf-8", value.encode()
        return 404, JSON, b'{"error": "not found"}'
    if method == "PUT":
        if not path.startswith("/kv/") or len(path) <= 4:
            return 404, JSON, b'{"error": "not found"}'
        try:
            value = body.decode()
        except UnicodeDecodeError:
            return 400, JSON, b'{"error": "the value is not UTF-8"}'
        store.put(unquote(path[4:]), value)
        return 204, JSON, b""
    return 405, JSON, b'{"error": "method not allowed"}'


def read_request(rf: io.BufferedReader) -> tuple[str, str, dict[bytes, bytes]] | None:
    """The request line and headers (names lower-cased); None at a clean end."""
    readline = rf.readline
    line = readline(MAX_LINE + 1)
    while line in (b"\r\n", b"\n"):  # stray line ends between requests are allowed
        line = readline(MAX_LINE + 1)
    if not line:
        return None
    if len(line) > MAX_LINE:
        raise HttpError(400, "request line too long")
    parts = line.split()
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        raise HttpError(400, "malformed request line")
    headers: dict[bytes, bytes] = {b":version": parts[2]}
    for _ in range(MAX_HEADERS + 1):
        h = readline(MAX_LINE + 1)
        if h in (b"\r\n", b"\n"):
            return parts[0].decode("latin-1"), parts[1].decode("latin-1"), headers
        if not h:
            raise HttpError(400, "connection closed in the headers")
        name, sep, value = h.partition(b":")
        if not sep or len(h) > MAX_LINE:
            raise HttpError(431 if sep else 400, "malformed or oversize header")
        headers[name.strip().lower()] = value.strip()
    raise HttpError(431, "too many headers")


def body_length(headers: dict[bytes, bytes]) -> int:
    if b"transfer-encoding" in headers:
        raise HttpError(411, "chunked bodies are not accepted: send content-length")
    raw = headers.get(b"content-length", b"0")
    if not raw.isdigit():
        raise HttpError(400, "bad content-length")
    length = int(raw)
    if length > MAX_VALUE:
        raise HttpError(413, f"value too large (max {MAX_VALUE} bytes)")
    return length


def respond(conn: socket.socket, code: int, ctype: str, body: bytes, keep: bool) -> None:
    head = f"HTTP/1.1 {code} {_REASONS.get(code, 'Error')}\r\ncontent-type: {ctype}\r\n"
    head += f"content-length: {len(body)}\r\n"
    if not keep:
        head += "connection: close\r\n"
    conn.sendall(head.encode() + b"\r\n" + body)


def serve_connection(conn: socket.socket, store: Store) -> None:
    """Requests of one connection, in order, until it closes or asks to."""
    rf = conn.makefile("rb")
    try:
        while True:
            try:
                got = read_request(rf)
                if got is None:
                    return
                method, path, headers = got
                length = body_length(headers)
            except HttpError as exc:
                why = json.dumps({"error": str(exc)}).encode()
                respond(conn, exc.code, JSON, why, keep=False)
                return
            body = rf.read(length) if length else b""
            if len(body) < length:
                return  # the client went away mid-body: nothing was written
            keep = headers[b":version"] == b"HTTP/1.1" and (
                headers.get(b"connection", b"").lower() != b"close"
            )
            code, ctype, out = answer(method, path, body, store)
            respond(conn, code, ctype, out, keep)
            if not keep:
                return
    except OSError:
        return  # reset by the client
    finally:
        rf.close()
        conn.close()


def parse_args(argv: list[str]) -> tuple[int, str]:
    port, data = 8080, os.environ.get("EDGEVISOR_DATA", "/data")
    it = iter(argv)
    for arg in it:
        name, eq, value = arg.partition("=")
        if name not in ("--port", "--data"):
            sys.exit(f"kv: unknown argument {arg!r} (usage: kv.py [--port N] [--data DIR])")
        if not eq:
            value = next(it, "")
        if name == "--port":
            if not value.isdigit() or int(value) > 65535:
                sys.exit(f"kv: --port needs a port number, got {value!r}")
            port = int(value)
        else:
            data = value
    return port, data


def main() -> None:
    port, data = parse_args(sys.argv[1:])
    store = Store(data)
    server = socket.create_server(("0.0.0.0", port), backlog=128)
    port = server.getsockname()[1]  # the one chosen when asked for 0
    print(f"kv: serving on :{port} with {len(store.data)} keys from {store.path}", flush=True)
    while True:
        conn, _ = server.accept()
        threading.Thread(target=serve_connection, args=(conn, store), daemon=True).start()


if __name__ == "__main__":
    main()

"""A small key-value HTTP service that keeps its data on its volume (the example domain).

    GET  /healthz        {"ok": true, "keys": N, "writes": N}
    GET  /kv/KEY         the value (200) or 404
    PUT  /kv/KEY         body = value; 204 once the write is durable (fsync'd)
    GET  /kv             {"KEY": "VALUE", ...}

Data: an append-only log ``<data>/kv.log``, one JSON line per write, fsync'd before the
write is acknowledged; replayed at start (a torn last line is dropped). Standard library
only, so it runs with ``python -I -S`` inside a domain.

Usage: ``python kv.py [--port 8080] [--data $EDGEVISOR_DATA or /data]``
"""

from __future__ import annotations

import argparse
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

MAX_VALUE = 1 << 20


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


def make_handler(store: Store) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass  # quiet: one line per request would fill the domain's log

        def _send(self, code: int, body: bytes = b"", ctype: str = "application/json") -> None:
            self.send_response(code)
            self.send_header("content-type", ctype)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            if body:
                self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path == "/healthz":
                body = {"ok": True, "keys": len(store.data), "writes": store.writes}
                self._send(200, json.dumps(body).encode())
            elif self.path == "/kv":
                with store.lock:
                    snapshot = dict(store.data)
                self._send(200, json.dumps(snapshot).encode())
            elif self.path.startswith("/kv/"):
                value = store.data.get(unquote(self.path[4:]))
                if value is None:
                    self._send(404, b'{"error": "no such key"}')
                else:
                    self._send(200, value.encode(), "text/plain; charset=utf-8")
            else:
                self._send(404, b'{"error": "not found"}')

        def do_PUT(self) -> None:
            if not self.path.startswith("/kv/") or len(self.path) <= 4:
                self._send(404, b'{"error": "not found"}')
                return
            length = int(self.headers.get("content-length") or 0)
            if length > MAX_VALUE:
                self._send(413, b'{"error": "value too large"}')
                return
            value = self.rfile.read(length).decode()
            store.put(unquote(self.path[4:]), value)
            self._send(204)

    return Handler


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--data", default=os.environ.get("EDGEVISOR_DATA", "/data"))
    args = ap.parse_args()
    store = Store(args.data)
    server = ThreadingHTTPServer(("0.0.0.0", args.port), make_handler(store))
    print(f"kv: serving on :{args.port} with {len(store.data)} keys from {store.path}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()

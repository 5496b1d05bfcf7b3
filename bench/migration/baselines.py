"""Baselines for the post-switch fill, measured on this machine in the bench's own run.

* :func:`copy_file_range_s`: the issue's baseline, ``os.copy_file_range`` of a file of the
  same size on the same disk, fsync'd (a local copy in the kernel: no network, no crypto).
* :func:`tls_stream_s`: the ceiling of any fill over the hosts' authenticated link: the
  same bytes as one TLS 1.3 stream between two processes on loopback (the fleet's own
  certificates, mutual authentication, Python's ``ssl`` as the agents use it), received
  into a file with ``pwrite`` and fsync'd; no NBD, no block bookkeeping. Both ends'
  CPU time is reported too: on a machine whose cores the two simulated hosts share, the
  fill is bound by it.

    .venv/bin/python bench/migration/baselines.py [--size 1G]
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import ssl
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from edgevisor.pki import FleetCA
from edgevisor.sdk.volumes import parse_size

__all__ = ["TlsStream", "copy_file_range_s", "tls_stream_s"]

_CHUNK = 4 << 20


def copy_file_range_s(dirpath: Path, size: int) -> float:
    """Seconds for os.copy_file_range of ``size`` bytes (a written file, fsync'd)."""
    src, dst = dirpath / "raw-src", dirpath / "raw-dst"
    chunk = os.urandom(_CHUNK)
    with open(src, "wb") as f:
        for _ in range(size // len(chunk)):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    t0 = time.perf_counter()
    try:
        with open(src, "rb") as fi, open(dst, "wb") as fo:
            left = size
            while left:
                n = os.copy_file_range(fi.fileno(), fo.fileno(), left)
                if n == 0:
                    break
                left -= n
            os.fsync(fo.fileno())
        return time.perf_counter() - t0
    finally:
        src.unlink(missing_ok=True)
        dst.unlink(missing_ok=True)


@dataclass(frozen=True)
class TlsStream:
    seconds: float
    receiver_cpu_s: float
    sender_cpu_s: float


def _contexts(dirpath: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """Server and client contexts as two fleet hosts have them (mutual TLS)."""
    ca = FleetCA.load_or_create(dirpath / "ca")
    paths = {}
    for who in ("source", "target"):
        key, cert, _serial = ca.issue_key_and_cert(who, dns=(who,), server=True)
        (dirpath / f"{who}.key").write_text(key)
        (dirpath / f"{who}.crt").write_text(cert)
        paths[who] = (dirpath / f"{who}.crt", dirpath / f"{who}.key")
    (dirpath / "ca.crt").write_text(ca.cert_pem)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.minimum_version = ssl.TLSVersion.TLSv1_3
    server.load_cert_chain(*paths["source"])
    server.load_verify_locations(dirpath / "ca.crt")
    server.verify_mode = ssl.CERT_REQUIRED
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.minimum_version = ssl.TLSVersion.TLSv1_3
    client.load_cert_chain(*paths["target"])
    client.load_verify_locations(dirpath / "ca.crt")
    return server, client


def tls_stream_s(dirpath: Path, size: int) -> TlsStream:
    """``size`` bytes from a sender process to this one over mutual TLS on loopback,
    stored with pwrite into a file and fsync'd; the time from the first byte asked."""
    server_ctx, client_ctx = _contexts(dirpath)
    lsock = socket.create_server(("127.0.0.1", 0))
    port = lsock.getsockname()[1]
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the sender: a process of its own, as the source host's agent is
        code = 1
        try:
            os.close(rfd)
            conn, _ = lsock.accept()
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                chunk = os.urandom(_CHUNK)
                c0 = time.process_time()
                left = size
                while left > 0:
                    left -= tls.send(chunk[: min(left, len(chunk))])
                os.write(wfd, repr(time.process_time() - c0).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(wfd)
    lsock.close()
    path = dirpath / "tls-dst"
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    try:
        with (
            socket.create_connection(("127.0.0.1", port)) as raw,
            client_ctx.wrap_socket(raw, server_hostname="source") as tls,
        ):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                c0 = resource.getrusage(resource.RUSAGE_THREAD)
                t0 = time.perf_counter()
                got = 0
                while got < size:
                    n = tls.recv_into(view)
                    if not n:
                        raise ConnectionError(f"sender stopped at {got} of {size} bytes")
                    os.pwrite(fd, view[:n], got)
                    got += n
                os.fsync(fd)
                seconds = time.perf_counter() - t0
                c1 = resource.getrusage(resource.RUSAGE_THREAD)
            finally:
                os.close(fd)
        sender_cpu = float(os.read(rfd, 64) or b"nan")
    finally:
        os.close(rfd)
        os.waitpid(pid, 0)
        path.unlink(missing_ok=True)
    cpu = (c1.ru_utime - c0.ru_utime) + (c1.ru_stime - c0.ru_stime)
    return TlsStream(seconds, cpu, sender_cpu)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="1G")
    args = ap.parse_args()
    size = parse_size(args.size)
    with tempfile.TemporaryDirectory(prefix="edgevisor-bench-base-") as d:
        raw = copy_file_range_s(Path(d), size)
        tls = tls_stream_s(Path(d), size)
    gib = size / (1 << 30)
    print(
        f"{size >> 20} MiB: copy_file_range {raw:.2f} s ({size / raw / 1e6:.0f} MB/s); TLS "
        f"stream {tls.seconds:.2f} s ({size / tls.seconds / 1e6:.0f} MB/s), CPU "
        f"{tls.receiver_cpu_s / gib:.2f} s/GiB receiving + {tls.sender_cpu_s / gib:.2f} "
        f"s/GiB sending"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A volume source in its own process for the lazy-volume system test (not a test module).

    python volumes_wired_source.py VOLUME_DIR PORT PKI_DIR HOST PEER

Serves the volume at ``VOLUME_DIR`` as export ``src`` over NBD with TLS (the host
certificate in ``PKI_DIR``), openable by host ``PEER`` only; prints ``ready`` when it
listens, and flushes and exits on SIGTERM.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

from edgevisor.pki import HostIdentity
from edgevisor.storage.nbd_server import Export, NBDServer
from edgevisor.storage.volume import Volume


async def main(vol_dir: str, port: int, pki: str, host: str, peer: str) -> None:
    vol = Volume.open(vol_dir)
    ident = HostIdentity(Path(pki), host)
    server = NBDServer(ssl_context=ident.server_context(), tls_required=True)
    server.add_export(Export("src", vol, allowed_peers=frozenset({peer})))
    await server.start("127.0.0.1", port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    await stop.wait()
    await server.aclose()
    await vol.aclose()


if __name__ == "__main__":
    a = sys.argv[1:]
    asyncio.run(main(a[0], int(a[1]), a[2], a[3], a[4]))

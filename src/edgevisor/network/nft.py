"""In-process nftables through ``libnftables.so.1`` (ctypes).

The ``nft`` command costs 15 ms+ per call in process start alone; the library applies one
element in ~0.2 ms. Each :class:`Nft` owns one libnftables context. The context opens its
netlink socket when it is created, so a context created while the calling thread is inside
a network namespace keeps working on that namespace from any thread afterwards; that is
how one process drives the tables of several simulated hosts (``netns=``). An agent runs
in its host namespace and passes ``netns=None``.

Every buffer given to :meth:`Nft.run` is one kernel transaction: either all of it applies
or none of it does. Failures become :class:`NftError` carrying the library's message.
"""

from __future__ import annotations

import ctypes
import json
import threading
from typing import Any

from edgevisor.errors import UnavailableError
from edgevisor.network import netns as _netns

__all__ = ["Nft", "NftError"]

_LIBRARY = "libnftables.so.1"
_OUTPUT_JSON = 1 << 4  # NFT_CTX_OUTPUT_JSON
_lib_lock = threading.Lock()
_lib: ctypes.CDLL | None = None


class NftError(UnavailableError):
    """libnftables refused a command batch; nothing of the batch was applied."""

    code = "nft_failed"


def _library() -> ctypes.CDLL:
    global _lib
    with _lib_lock:
        if _lib is None:
            try:
                lib = ctypes.CDLL(_LIBRARY)
            except OSError as exc:  # the package libnftables1 is missing
                raise NftError(f"cannot load {_LIBRARY}: {exc}") from exc
            lib.nft_ctx_new.restype = ctypes.c_void_p
            lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
            lib.nft_ctx_free.restype = None
            lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_buffer_output.restype = ctypes.c_int
            lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_buffer_error.restype = ctypes.c_int
            lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
            lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
            lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_output_get_flags.restype = ctypes.c_uint
            lib.nft_ctx_output_get_flags.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_output_set_flags.restype = None
            lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
            lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
            lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
            _lib = lib
        return _lib


class Nft:
    """One libnftables context bound to a network namespace.

    Not thread-safe: the context's output buffers are shared, so calls are serialized
    with a lock.
    """

    def __init__(self, netns: str | None = None) -> None:
        self._lib = _library()
        self._lock = threading.Lock()
        self.netns = netns
        ctx = _netns.call_in(netns, lambda: self._lib.nft_ctx_new(0))
        if not ctx:
            raise NftError("nft_ctx_new failed")
        self._ctx: int | None = ctx
        self._lib.nft_ctx_buffer_output(ctx)
        self._lib.nft_ctx_buffer_error(ctx)

    def close(self) -> None:
        with self._lock:
            if self._ctx is not None:
                self._lib.nft_ctx_free(self._ctx)
                self._ctx = None

    def __enter__(self) -> Nft:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, buffer: str, *, json_output: bool) -> str:
        with self._lock:
            ctx = self._ctx
            if ctx is None:
                raise NftError("nftables context is closed")
            flags = self._lib.nft_ctx_output_get_flags(ctx)
            flags = flags | _OUTPUT_JSON if json_output else flags & ~_OUTPUT_JSON
            self._lib.nft_ctx_output_set_flags(ctx, flags)
            rc = self._lib.nft_run_cmd_from_buffer(ctx, buffer.encode())
            out = (self._lib.nft_ctx_get_output_buffer(ctx) or b"").decode(errors="replace")
            err = (self._lib.nft_ctx_get_error_buffer(ctx) or b"").decode(errors="replace")
        if rc != 0:
            raise NftError(
                f"nftables batch failed: {err.strip() or 'rc=' + str(rc)}",
                details={"rc": rc, "stderr": err[:4000]},
            )
        return out

    def run(self, commands: str) -> str:
        """Apply a text batch (one transaction); return the text output."""
        return self._run(commands, json_output=False)

    def run_json(self, commands: dict[str, Any]) -> Any:
        """Apply a libnftables JSON batch ``{"nftables": [...]}`` (one transaction)."""
        out = self._run(json.dumps(commands), json_output=True)
        return json.loads(out) if out.strip() else None

    def query(self, command: str) -> Any:
        """Run a listing command (e.g. ``list table ip t``) and return its parsed JSON."""
        out = self._run(command, json_output=True)
        return json.loads(out) if out.strip() else None

"""The in-environment runtime: where its file comes from and how it is started.

The runtime (``evruntime.py``, standard library only, self-contained) is placed in a
directory with precompiled bytecode, so a cold start compiles nothing; the sandbox
bind-mounts that directory read-only. It speaks the wire format of
``edgevisor/proto/runtime.py`` with its own few lines of framing: importing the proto core's
dataclasses and ``json`` would cost ~10-20 ms per cold start (``inspect``, ``re``).
"""

from __future__ import annotations

import json
import os
import py_compile
import shutil
import sys
from pathlib import Path
from typing import Any

__all__ = ["interpreter", "launch_argv", "prepare_runtime_dir"]

_RUNTIME_SRC = Path(__file__).with_name("evruntime.py")


def interpreter() -> str:
    """The real interpreter binary (not a pyenv shim or venv link): starts fastest."""
    return os.path.realpath(sys.executable)


def prepare_runtime_dir(dest: Path) -> Path:
    """Copy the runtime into ``dest`` and precompile it."""
    dest.mkdir(parents=True, exist_ok=True)
    for src, name in ((_RUNTIME_SRC, "evruntime.py"),):
        target = dest / name
        shutil.copy2(src, target)
        # Unchecked hash pycs stay valid whatever the mtime on the other side of a bind mount.
        py_compile.compile(
            str(target), cfile=None, doraise=True,
            invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
        )
    os.chmod(dest, 0o755)
    for path in dest.rglob("*"):
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    return dest


def launch_argv(runtime_dir: str, config: dict[str, Any], python: str | None = None) -> list[str]:
    """argv that starts the runtime from ``runtime_dir`` (as seen by the started process)."""
    code = f"import sys;sys.path.insert(0,{runtime_dir!r});import evruntime;evruntime.main()"
    return [python or interpreter(), "-I", "-S", "-c", code, json.dumps(config)]

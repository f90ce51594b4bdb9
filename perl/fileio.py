"""Writing a file so that a reader never sees half of it: a temporary file beside it, then a rename.

Usage:
    >>> from perl.fileio import atomic_write_text
    >>> atomic_write_text(Path("runs/x/summary.json"), json.dumps(summary))

The temporary file is ``.<name>.<pid>.tmp`` in the target's folder (a rename is atomic only within
one file system; the pid keeps two writers from sharing one temporary file). On any error it is
removed and the target is left as it was. The folder must exist. `RunStore` keeps its own
copy-append-replace (its temporary file is a netCDF copy it appends to, not bytes in memory).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["atomic_write_bytes", "atomic_write_text", "temp_path", "is_temp_of"]


def temp_path(path: str | os.PathLike) -> Path:
    """The temporary file `atomic_write_bytes` writes before renaming it to ``path``."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def is_temp_of(name: str, target: str) -> bool:
    """Whether file name ``name`` is a temporary file (of any process) left by writing ``target``."""
    return name.startswith(f".{target}.") and name.endswith(".tmp")


def atomic_write_bytes(path: str | os.PathLike, data: bytes, fsync: bool = False) -> Path:
    """Write ``data`` to ``path`` through a temporary file and `os.replace`; return the path.

    Args:
        path (str | Path): the file to (re)place; its folder must exist.
        data (bytes): the whole content.
        fsync (bool, defaults to False): flush the content to disk before the rename, so that
            after a power loss the file is the old or the new one, never empty.
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # note: after the rename there is nothing left to remove
    return path


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8", fsync: bool = False) -> Path:
    """`atomic_write_bytes` of ``text`` encoded as ``encoding`` (UTF-8 by default)."""
    return atomic_write_bytes(path, text.encode(encoding), fsync=fsync)

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

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "temp_path", "is_temp_of"]


def temp_path(path: str | os.PathLike) -> Path:
    """The temporary file `atomic_write_bytes` writes before renaming it to ``path``."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def is_temp_of(name: str, target: str) -> bool:
    """Whether file name ``name`` is a temporary file (of any process) left by writing ``target``."""
    return name.startswith(f".{target}.") and name.endswith(".tmp")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` for a writer that needs a file name (netCDF, pandas): renamed
    to ``path`` when the block ends without error, removed otherwise.

    Usage:
        >>> with atomic_path(folder / "summary.nc") as tmp:
        ...     ds.to_netcdf(tmp)
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # note: after the rename there is nothing left to remove


def atomic_write_bytes(path: str | os.PathLike, data: bytes, fsync: bool = False) -> Path:
    """Write ``data`` to ``path`` through a temporary file and `os.replace`; return the path.

    Args:
        path (str | Path): the file to (re)place; its folder must exist.
        data (bytes): the whole content.
        fsync (bool, defaults to False): flush the content to disk before the rename, so that
            after a power loss the file is the old or the new one, never empty.
    """
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    return path


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8", fsync: bool = False) -> Path:
    """`atomic_write_bytes` of ``text`` encoded as ``encoding`` (UTF-8 by default)."""
    return atomic_write_bytes(path, text.encode(encoding), fsync=fsync)

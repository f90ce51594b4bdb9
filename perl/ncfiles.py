"""Read handles on netCDF files: at most one per file in the process, shared by every reader in perl.

Opening a store file costs more than reading one (layer, module) cell from it (~5-9 ms against
~0.3 ms at Qwen2.5-1.5B shapes: netCDF-C parses every variable's metadata at open), so a reader
that opened the file at every read spent its time opening: a cell of a live 10,000-snapshot
store, 28 variables in 34 files, took 3.6 s. Readers here share open handles instead.

There is at most one handle per file (device, inode) in the process: every read of a store file in
perl (the header check, the store's readers and its writer reading the file it continues) goes
through :func:`reading`, so a file is opened once however many readers use it. The writer's own
files are new files (new inodes) renamed into place, never opened for reading while written, and
it writes them holding :func:`locked`.

A handle stays valid when the file's name is removed or replaced (a writer merging small files,
a resume truncating the store): the handle still reads the file as it was when it was opened,
which is the snapshot a lazily opened Dataset was built from. Handles are closed least recently
used first beyond `MAX_OPEN`, by a Dataset's ``close()`` (:func:`release`) and by :func:`close_all`;
one whose file was rewritten in place (same inode, other size or mtime) is opened again.
netCDF-C is not thread-safe: every use holds xarray's HDF5 lock (the one xarray's own netCDF4
backend takes), so dask threads, xarray's readers and a writer in another thread of the process
take turns (a reader thread beside the writer without it crashed the process: tests/test_store.py).

Usage:
    with reading(path) as handle:
        steps = handle.nc.variables["step"][:]
        handle.checked = True        # a validation that holds for this file as opened
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

MAX_OPEN = 128  # note: xarray's own default for its file cache (file_cache_maxsize)
# note: per variable; reads here take each chunk once, so a large cache only holds memory. netCDF-C's
# default (16 MB per variable) kept up to a whole decompressed file per handle
CHUNK_CACHE_BYTES = 1 << 18


@dataclass
class Handle:
    """An open netCDF file: ``nc`` (masking and scaling off: raw values), the identity of what was
    opened, and ``checked``, set by a caller whose validation of this file holds while it is open."""

    nc: object
    identity: tuple[int, int, int, int]  # (device, inode, size, mtime_ns)
    path: Path
    checked: bool = False


_handles: OrderedDict[tuple[int, int], Handle] = OrderedDict()


_rlock = threading.RLock()
_depth = 0  # note: how deep the thread holding _rlock is nested in `locked` (only it changes this)


@contextmanager
def locked() -> Iterator[None]:
    """xarray's HDF5 lock, re-entrant for perl (a reader may check a header while it reads). Held by
    every read here and by the store's writer, so netCDF-C is never entered by two threads at once."""
    global _depth
    from xarray.backends.locks import HDF5_LOCK

    with _rlock:
        if _depth == 0:
            HDF5_LOCK.acquire()
        _depth += 1
        try:
            yield
        finally:
            _depth -= 1
            if _depth == 0:
                HDF5_LOCK.release()


def identity(path: str | os.PathLike) -> tuple[int, int, int, int]:
    """(device, inode, size, mtime_ns) of the file at ``path`` (FileNotFoundError if none)."""
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@contextmanager
def reading(
    path: str | os.PathLike, opened: tuple[int, int, int, int] | None = None, keep: bool = True
) -> Iterator[Handle]:
    """The open handle on the file at ``path`` (opened now, or shared), under the HDF5 lock.

    Args:
        path (str | Path): a netCDF file.
        opened (tuple, optional): the identity of the file as an earlier read found it. Its handle is
            used while it is open, even when ``path`` names another file by now; when it was closed
            and ``path`` holds another file, FileNotFoundError (the caller finds where the data went).
        keep (bool, defaults to True): keep the handle open for later reads. False closes a handle
            this call opened when it ends (a one-off read, or a writer reading a file it is about to
            replace), and leaves one that was open before.

    Raises:
        FileNotFoundError: no file at ``path`` (or not the one asked for).
        OSError, RuntimeError: netCDF4 cannot open it (not a netCDF file, damaged).
    """
    with locked():
        handle, fresh = _handle(Path(path), opened)
        try:
            yield handle
        finally:
            if fresh and not keep:
                _close(handle.identity[:2])


def _handle(path: Path, opened: tuple[int, int, int, int] | None) -> tuple[Handle, bool]:
    """The shared handle on ``path`` and whether it was opened now."""
    import netCDF4

    if opened is not None:
        held = _handles.get(opened[:2])
        if held is not None and held.identity == opened:
            _handles.move_to_end(opened[:2])
            return held, False
    now = identity(path)
    if opened is not None and now != opened:
        raise FileNotFoundError(f"{path} is not the file that was opened any more")
    key = now[:2]
    held = _handles.get(key)
    if held is not None:
        if held.identity == now:
            _handles.move_to_end(key)
            return held, False
        _close(key)  # note: the same inode, rewritten in place (not by perl): open it again
    nc = netCDF4.Dataset(path, "r")
    try:
        nc.set_auto_maskandscale(False)
        for var in nc.variables.values():
            if var.chunking() != "contiguous":
                var.set_var_chunk_cache(size=CHUNK_CACHE_BYTES)
    except Exception:
        nc.close()
        raise
    _handles[key] = Handle(nc, now, path)
    while len(_handles) > MAX_OPEN:
        _close(next(iter(_handles)))
    return _handles[key], True


def _close(key: tuple[int, int]) -> None:
    handle = _handles.pop(key, None)
    if handle is not None:
        try:
            handle.nc.close()
        except Exception:  # noqa: BLE001 - a handle whose file is damaged still has to go
            pass


def close_all() -> None:
    """Close every shared handle (e.g. before removing run folders, to give their space back at once)."""
    with locked():
        for key in list(_handles):
            _close(key)


def release(identities) -> None:
    """Close the handles on these files (identities as `Handle.identity`), if open: a Dataset's
    ``close()``. Readers that still need them open them again."""
    with locked():
        for ident in identities:
            held = _handles.get(ident[:2])
            if held is not None and held.identity == tuple(ident):
                _close(ident[:2])


def open_count() -> int:
    """How many files are open here (for tests and benchmarks)."""
    return len(_handles)

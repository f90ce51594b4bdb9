"""The run store: a folder of small netCDF files per tracker, crash-safe and readable while it grows.

This is the one module that knows netCDF. A tracker hands it one labelled ``xr.Dataset`` per
snapshot; the store keeps them along the ``step`` dimension.

Layout. The live store (``spectral_logs/spectral_history.nc``) is a folder of netCDF files named
``steps_<first>_<last>.nc``, each a complete, self-describing netCDF file (dims, coordinates,
attrs) holding a run of consecutive snapshots:

- the newest file holds the last < ``BLOCK`` snapshots; an append copies it (at most ``BLOCK``
  snapshots, a few MB at 1.5B shapes), appends to the copy, fsyncs it and renames it into place
  under its new name, then removes the old one. Once it holds ``BLOCK`` snapshots it is left as
  it is and the next append starts a new file;
- every ``MERGE`` full files are merged into one file of ``BLOCK * MERGE`` snapshots, written
  fresh with chunks of one (layer, module) cell, renamed into place, and the small files removed.

So the cost of an append does not depend on how long the run is (it copies at most ``BLOCK``
snapshots; once every ``BLOCK * MERGE`` appends, a merge reads and writes that many), and a store
of 10,000 snapshots is at most ~40 files. Every file is written under a hidden temporary name
and ``os.replace``d into place, and no visible file is ever modified: a reader sees complete
files only, and a writer killed by SIGKILL at any moment leaves every earlier snapshot readable.
Where a new file covers the steps of older ones that were not removed yet (a merge, or a kill
between rename and removal), readers take the file covering the widest range. ``finalize``
writes the consolidated single ``*_final.nc`` file at the end of training. A store written by an
earlier version as one ``.nc`` file is still read, and continued in the folder layout.

Storage: merged and final files are compressed losslessly (zlib + shuffle) in chunks of one
(layer, module) cell; small files are not compressed (appends fill their one chunk per variable in
place; HDF5 would not reuse the space of a rewritten compressed chunk). A store created with
``float32=True`` keeps float64 values as float32 (for quantities computed from float32
weights, where the extra digits are rounding noise of the computation, not data) and says so in
the global attr ``stored_float_precision``.

Schema rules:
- ``step`` is the only growing dimension; every other dimension (``layer``, ``module``, ``sv``,
  ...) and its coordinate values are fixed by the first append. A later append with other sizes
  or labels is refused with a clear error.
- Trackers declare every variable at the first append (NaN-filled where a quantity does not
  exist yet). A variable that first appears in a later append is still accepted: earlier steps
  read NaN. A variable missing from an append reads NaN at that step.
- NaN and Inf are stored as they are. Floating variables have ``_FillValue = NaN``.
- Variables without a ``step`` dimension are static: written at every append (last wins).
- Strings (coordinates such as ``module``, ``component``) are netCDF variable-length strings.
"""

from __future__ import annotations

import bisect
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import netCDF4
import numpy as np
import xarray as xr

__all__ = ["RunStore", "StoreError", "BLOCK", "MERGE"]

STEP = "step"
BLOCK = 32            # snapshots per small file (the most an append ever copies)
MERGE = 32            # full small files merged into one file of BLOCK * MERGE snapshots
PART = re.compile(r"^steps_(-?\d+)_(-?\d+)\.nc$")
# note: readers load files this small into memory at once (the writer removes them when it
# continues or merges them); larger files are never removed while training runs, so they are read lazily
_CELL_DIMS = ("layer", "module")
_CHUNK_BYTES = 1 << 16
_READ_RETRIES = 20


class StoreError(ValueError):
    """A dataset that does not fit the store's schema, or a store file that cannot be read."""


class RunStore:
    """A growing netCDF store of labelled snapshots, one ``step`` at a time.

    Usage:
        store = RunStore("run/spectral_logs/spectral_history.nc", attrs={"peft_type": "lora"})
        store.append(snapshot)          # snapshot: xr.Dataset with dims (step=1, layer, module, ...)
        store.steps                     # [0, 10, 20]
        store.truncate_after(10)        # on resume from checkpoint-10: drop steps > 10
        store.finalize("run/spectral_history_final.nc")
        ds = RunStore.open("run/spectral_logs/spectral_history.nc")   # any process, any time
        ds = RunStore.open(path, lazy=True)   # dask-backed: reads only what is selected

    Args:
        path (str | Path): the store (a folder of netCDF files, see the module docstring).
            Created (with its parents) at the first append; an existing store is continued (resume).
        attrs (dict, optional): global attributes written into the file at every append, merged
            over the appended Dataset's own attrs. Values may be str, numbers, lists of numbers
            or strings; dicts are stored as JSON, bools as 0/1, None is skipped.
        float32 (bool, defaults to False): store float64 data variables as float32 (lossless for
            values computed from float32 weights up to float32 rounding; said in the attrs).
    """

    def __init__(self, path: str | os.PathLike, attrs: dict | None = None, float32: bool = False):
        self.path = Path(path)
        self.attrs = dict(attrs or {})
        self.float32 = bool(float32)
        self._steps: list[int] = _read_steps(self.path) if self.path.exists() else []
        self._remove_stale_temporaries()

    # ---------------------------------------------------------------- reading
    @property
    def steps(self) -> list[int]:
        """The step numbers stored so far, in order."""
        return list(self._steps)

    def read(self) -> xr.Dataset:
        """The whole store, loaded into memory (files closed). Empty Dataset if nothing stored."""
        if not self.path.exists():
            return xr.Dataset(attrs=_clean_attrs(self.attrs))
        return RunStore.open(self.path)

    @staticmethod
    def is_store(path: str | os.PathLike) -> bool:
        """True for a store folder (one holding ``steps_*.nc`` files); False for other folders and files."""
        path = Path(path)
        return path.is_dir() and bool(_parts(path))

    @staticmethod
    def open(path: str | os.PathLike, lazy: bool = False, decode: bool = True) -> xr.Dataset:
        """Read a store (live folder, final file, or an older single-file store).

        ``lazy=False`` reads everything into memory and closes the files at once. ``lazy=True``
        returns dask-backed variables: a final file reads only the chunks of what is selected; a
        live folder reads by file and layer, opening the file at each read (no handle is held,
        and a file the writer has merged or continued since is read where its steps are now).

        Args:
            path (str | Path): a store folder or a ``.nc`` file written by a RunStore.
            lazy (bool, defaults to False): see above.
            decode (bool, defaults to True): False leaves CF decoding (masks, bools, coordinates)
                to the caller, e.g. ``xr.decode_cf`` once on many stores combined (it costs more
                than the opening itself).
        """
        path = Path(path)
        if path.is_dir():
            for attempt in range(_READ_RETRIES):
                files = [p for _, _, p in _parts(path)]
                if not files:
                    raise FileNotFoundError(f"The run store {path} holds no snapshots yet (no steps_*.nc files); "
                                            "check the run folder, or wait for the first snapshot.")
                try:
                    if lazy:
                        joined = _open_files_lazily(files)
                        if joined is not None:
                            return _decode_attrs(xr.decode_cf(joined) if decode else joined)
                    parts = [_open_file(p, lazy=lazy and _n_steps_hint(p) > BLOCK, decode=decode) for p in files]
                except FileNotFoundError:
                    continue  # the writer replaced a file between listing and opening: list again
                return _decode_attrs(_combine(parts))
            raise StoreError(f"The run store {path} changed at every one of {_READ_RETRIES} attempts to read it; try again.")
        if not path.is_file():
            raise FileNotFoundError(f"No run store at {path}: expected a store folder or a .nc file written by a tracker; "
                                    "check the run folder.")
        return _decode_attrs(_open_file(path, lazy=lazy, decode=decode))

    @staticmethod
    def open_stacked(paths: list, dim: str = "run") -> xr.Dataset | None:
        """Single-file stores of one layout (a sweep's final files) stacked along ``dim``, lazily, not decoded.

        The first file is opened by xarray; the others only by netCDF4, their variables wrapped in
        dask arrays directly: opening 100 files through xarray took ~0.3 s each on 2 busy cores,
        this ~0.03 s (benchmarks/open_runs.py). Returns None when a path is a store folder or a
        file's variables, dimensions, dtypes or coordinate values differ from the first's: the
        caller then opens them one by one. Decode the result with ``xr.decode_cf``.

        Args:
            paths (list of str | Path): ``.nc`` files written by RunStore (e.g. ``*_final.nc``).
            dim (str, defaults to "run"): the new leading dimension.
        """
        import dask.array as dsa

        paths = [Path(p) for p in paths]
        if not paths or not all(p.is_file() for p in paths):
            return None
        for path in paths:
            _check_header(path)
        files, first, attrs, same = [], None, {}, True
        try:
            for path in paths:
                try:
                    nc = netCDF4.Dataset(path, "r")  # note: stays open while the dask arrays below live
                except OSError as err:
                    raise StoreError(f"Cannot read run store {path} ({err}); expected a netCDF4 file written by a tracker.") from err
                files.append(nc)
                nc.set_auto_maskandscale(False)
                if first is None:
                    first = _static_part(nc)  # coordinates, static variables, attrs (raw)
                    attrs = dict(first.attrs)
                same = _same_layout(nc, files[0], first)
                if not same:
                    break
                attrs = {k: v for k, v in attrs.items() if k in nc.ncattrs() and _equal_attr(nc.getncattr(k), v)}
            if not same:
                return None
            token = "-".join(f"{p}:{p.stat().st_mtime_ns}" for p in paths)
            data = {}
            for name in files[0].variables:
                raw = files[0].variables[name]
                if name in first.coords:
                    continue  # dimension coordinates: the first file's (checked equal in every file)
                dtype, attrs_ = _decoded(raw)
                stacked = _Stacked([_FileVariable(p, name) for p in paths], raw.shape, dtype)
                chunks = (1, *(max(1, n) for n in raw.shape))
                array = dsa.from_array(stacked, chunks=chunks, name=f"perl-stacked-{abs(hash(token))}-{name}",
                                       meta=np.empty((0,) * stacked.ndim, dtype=dtype))
                data[name] = ((dim, *raw.dimensions), array, attrs_)
        finally:
            # note: no handle stays open: closing one of two netCDF handles on a file while reading
            # through the other crashed the process (segfault); each read opens its file
            for nc in files:
                nc.close()
        stacked_ds = first.assign(data)
        stacked_ds.attrs = attrs
        return _decode_attrs(stacked_ds)

    # ---------------------------------------------------------------- writing
    def append(self, ds: xr.Dataset) -> None:
        """Append one snapshot (or several consecutive steps) to the store, atomically.

        Args:
            ds (xr.Dataset): has a ``step`` dimension (or a scalar ``step`` coordinate, which
                gives every data variable a step dimension) whose values are all greater than the
                last stored step; every other dimension matches the store's.
        """
        ds = self._prepared(ds)
        new_steps = [int(s) for s in ds[STEP].values]
        if any(b <= a for a, b in zip(new_steps, new_steps[1:])):
            raise StoreError(f"Steps to append must increase, got {new_steps}.")
        staging = self._to_folder()
        parts = _parts(self.path) if staging is None else []
        if parts and (not self._steps or parts[-1][1] != self._steps[-1]):
            self._steps = _read_steps(self.path)  # another RunStore object wrote here since
        if self._steps and new_steps and new_steps[0] <= self._steps[-1]:
            raise StoreError(
                f"Step {new_steps[0]} is not after the last stored step {self._steps[-1]} in {self.path}; "
                f"call truncate_after({new_steps[0] - 1}) first when resuming from an earlier checkpoint."
            )
        if not new_steps:
            return
        last = parts[-1] if parts else None
        held = self._count(last[0], last[1]) if last else 0
        previous: dict = {}
        if last is not None:
            with netCDF4.Dataset(last[2], "r") as nc:
                _check_schema(nc, ds, self.path)
                previous = {k: nc.getncattr(k) for k in nc.ncattrs() if k != "coordinates"}
        attrs = {**previous, **ds.attrs, **self.attrs}  # global attrs accumulate, the latest value wins
        if last is not None and held + len(new_steps) <= BLOCK:
            # continue the newest small file: copy it (at most BLOCK snapshots), append to the copy (one
            # chunk per step: nothing already written is rewritten), rename it in under its new name
            tmp = self._temporary()
            try:
                shutil.copyfile(last[2], tmp)
                with netCDF4.Dataset(tmp, "a") as nc:
                    _append_into(nc, ds, layout=SMALL, float32=self.float32)
                    _set_global_attrs(nc, attrs)
                _fsync_and_replace(tmp, self._name(last[0], new_steps[-1]))
            finally:
                tmp.unlink(missing_ok=True)
            _unlink_quietly(last[2])
        elif staging is not None:
            # the first file is written in a hidden folder renamed into place: a store that exists has a snapshot
            _write_file(staging / self._name(new_steps[0], new_steps[-1]).name, ds, attrs, layout=SMALL, float32=self.float32)
            _fsync_and_replace(staging, self.path)
        else:
            _write_file(self._name(new_steps[0], new_steps[-1]), ds, attrs, layout=SMALL, float32=self.float32)
        self._steps.extend(new_steps)
        self._merge_if_due()

    def truncate_after(self, step: int) -> None:
        """Drop every stored step greater than ``step`` (resume from checkpoint-``step``).

        Args:
            step (int): the last step to keep.
        """
        if not self.path.exists() or not self._steps or self._steps[-1] <= step:
            return
        if self.path.is_file():  # an older single-file store: rewrite it
            ds = RunStore.open(self.path)
            ds = ds.isel({STEP: np.flatnonzero(ds[STEP].values <= step)})
            _write_file(self.path, ds, ds.attrs, layout=CELL)
            self._steps = [s for s in self._steps if s <= step]
            return
        for first, last, file in _parts(self.path):
            if first <= step < last:  # the file that straddles the resume point: keep its head
                ds = _open_file(file, lazy=False)
                ds = ds.isel({STEP: np.flatnonzero(ds[STEP].values <= step)})
                kept = int(ds[STEP].values[-1])
                # note: a head that may be continued must keep the small files' layout (filled in place)
                _write_file(self._name(first, kept), ds, ds.attrs, layout=SMALL if ds.sizes[STEP] <= BLOCK else CELL)
        # note: only after the head is in place, so a kill here leaves the old (untruncated) view
        for name in os.listdir(self.path):
            match = PART.match(name)
            if match and int(match[2]) > step:
                _unlink_quietly(self.path / name)
        self._steps = [s for s in self._steps if s <= step]

    def clear(self) -> None:
        """Delete the store (a new run reusing the folder); the next append starts a new schema."""
        if self.path.is_dir():
            for name in os.listdir(self.path):
                if PART.match(name) or name.endswith(".tmp"):
                    _unlink_quietly(self.path / name)
            try:
                self.path.rmdir()
            except OSError:
                pass  # note: files that are not ours stay
        else:
            self.path.unlink(missing_ok=True)
        self._steps = []

    def finalize(self, final_path: str | os.PathLike) -> Path:
        """Write the whole store as one consolidated, compressed netCDF file (atomic too).

        Written ``BLOCK * MERGE`` steps at a time, so memory does not grow with the run; chunks
        hold one (layer, module) cell, so a reader of one cell's history reads little else.

        Args:
            final_path (str | Path): destination, e.g. ``<run>/spectral_history_final.nc``.
        """
        final_path = Path(final_path)
        if not self.path.exists():
            _write_file(final_path, xr.Dataset(), self.attrs, layout=CELL)
            return final_path
        if self.path.is_file():
            ds = RunStore.open(self.path)
            _write_file(final_path, ds, {**ds.attrs, **self.attrs}, layout=CELL)
            return final_path
        # note: file by file, read whole (opening a file per lazy chunk re-read its metadata each time)
        files = [p for _, _, p in _parts(self.path)]
        final_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = final_path.with_name(f".{final_path.name}.{os.getpid()}.tmp")
        span, held, written = BLOCK * MERGE, [], False
        try:
            for i, file in enumerate(files):
                held.append(_open_file(file, lazy=False))
                if sum(d.sizes.get(STEP, 0) for d in held) < span and i < len(files) - 1:
                    continue
                slab = _stack(held)
                attrs = {**slab.attrs, **self.attrs}
                if not written:
                    _write_file(tmp, slab, attrs, layout=CELL, replace=False)
                    written = True
                else:
                    with netCDF4.Dataset(tmp, "a") as nc:
                        _append_into(nc, slab, layout=CELL)
                        _set_global_attrs(nc, attrs)
                held = []
            _fsync_and_replace(tmp, final_path)
        finally:
            tmp.unlink(missing_ok=True)
        return final_path

    # ---------------------------------------------------------------- helpers
    def _prepared(self, ds: xr.Dataset) -> xr.Dataset:
        ds = _as_step_dataset(ds)
        ds.attrs = {**ds.attrs, "stored_float_precision": _precision_note(ds, self.float32)}
        return ds

    def _count(self, first: int, last: int) -> int:
        return bisect.bisect_right(self._steps, last) - bisect.bisect_left(self._steps, first)

    def _name(self, first: int, last: int) -> Path:
        return self.path / f"steps_{first:010d}_{last:010d}.nc"

    def _temporary(self) -> Path:
        return self.path / f".{os.getpid()}.tmp"

    def _merge_if_due(self) -> None:
        """Merge the trailing run of full small files once there are MERGE of them."""
        parts = _parts(self.path)
        tail = []
        for first, last, file in reversed(parts):
            if self._count(first, last) > BLOCK:
                break
            tail.append((first, last, file))
        tail.reverse()
        if not tail or self._count(*tail[-1][:2]) < BLOCK:
            tail = tail[:-1]  # the newest file is still filling up
        if len(tail) < MERGE:
            return
        tail = tail[-MERGE:] if len(tail) > MERGE else tail
        parts_ds = [_open_file(file, lazy=False) for _, _, file in tail]
        merged = _stack(parts_ds)
        attrs = {**merged.attrs, **self.attrs}
        _write_file(self._name(tail[0][0], tail[-1][1]), merged, attrs, layout=CELL)
        for _, _, file in tail:
            _unlink_quietly(file)

    def _to_folder(self) -> Path | None:
        """Move an older single-file store into the folder layout (continued as its first file).

        Returns a new hidden folder to write the first file into when there is no store yet.
        """
        if self.path.is_dir():
            return None
        staging = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
        if not self.path.is_file():
            return staging
        steps = _read_steps(self.path)
        if steps:
            os.replace(self.path, staging / f"steps_{steps[0]:010d}_{steps[-1]:010d}.nc")
        _fsync_and_replace(staging, self.path)
        return None

    def _remove_stale_temporaries(self) -> None:
        # a writer killed mid-append leaves its temporary behind; the store itself is intact
        folders = [self.path] if self.path.is_dir() else []
        if self.path.parent.is_dir():
            folders.append(self.path.parent)
        for folder in folders:
            for tmp in folder.glob(".*.tmp"):
                pid = tmp.name[1:-4].rsplit(".", 1)[-1]
                if pid.isdigit() and not _pid_alive(int(pid)):
                    if tmp.is_dir():
                        shutil.rmtree(tmp, ignore_errors=True)
                    else:
                        tmp.unlink(missing_ok=True)


# -------------------------------------------------------------------- reading files
def _parts(folder: Path) -> list[tuple[int, int, Path]]:
    """The store's files that together hold every stored step once, in step order.

    Files are nested or disjoint by construction; of nested ones the widest wins (a merged file
    whose small files were not removed yet).
    """
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    entries = []
    for name in names:
        match = PART.match(name)
        if match:
            entries.append((int(match[1]), int(match[2]), folder / name))
    entries.sort(key=lambda e: (e[0], -e[1]))
    chosen: list[tuple[int, int, Path]] = []
    for entry in entries:
        if not chosen or entry[0] > chosen[-1][1]:
            chosen.append(entry)
    return chosen


def _n_steps_hint(path: Path) -> int:
    match = PART.match(path.name)
    return int(match[2]) - int(match[1]) + 1 if match else BLOCK + 1


def _open_file(path: Path, lazy: bool, decode: bool = True) -> xr.Dataset:
    _check_header(path)
    try:
        ds = xr.open_dataset(path, engine="netcdf4", cache=False, chunks=-1 if lazy else None, decode_cf=decode)
        if not lazy:
            with ds:
                ds = ds.load()
        return ds
    except FileNotFoundError:
        raise
    except Exception as err:  # noqa: BLE001 - netCDF4/HDF5 raise many types for a damaged file
        if not path.exists():  # note: HDF5 reports a file removed while it opened it as an "HDF error"
            raise FileNotFoundError(str(path)) from err
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise StoreError(f"Cannot read run store {path} ({reason}); expected a netCDF4 file written by a tracker.") from err


def _combine(parts: list[xr.Dataset]) -> xr.Dataset:
    """Files of one store as one Dataset: step variables concatenated, static ones from the last file."""
    if len(parts) == 1:
        return parts[0]
    last = parts[-1]
    static = [name for name in last.data_vars if STEP not in last[name].dims]
    stepped = [ds.drop_vars([n for n in ds.data_vars if STEP not in ds[n].dims]) for ds in parts]
    combined = xr.concat(stepped, dim=STEP, data_vars="minimal", coords="minimal", compat="override",
                         join="override", combine_attrs="override")
    combined = combined.assign({name: last[name] for name in static})
    combined.attrs = dict(last.attrs)
    return combined


def _stack(parts: list[xr.Dataset]) -> xr.Dataset:
    """In-memory Datasets of consecutive steps as one (what `_combine` does, in numpy: fast for the writer)."""
    if len(parts) == 1:
        return parts[0]
    last = parts[-1]
    names = dict.fromkeys(n for d in parts for n in d.variables if n not in d.dims)
    variables = {}
    for name in names:
        ref = next(d.variables[name] for d in reversed(parts) if name in d.variables)
        if STEP not in ref.dims:
            variables[name] = ref  # static: the last value wins
            continue
        axis = ref.dims.index(STEP)
        pieces = []
        for d in parts:
            if name in d.variables:
                pieces.append(d.variables[name].transpose(*ref.dims).values)
            else:  # a variable that first appears later reads NaN before
                shape = list(ref.shape)
                shape[axis] = d.sizes[STEP]
                pieces.append(np.full(shape, np.nan, dtype=np.result_type(ref.dtype, np.float32)))
        variables[name] = xr.Variable(ref.dims, np.concatenate(pieces, axis=axis), ref.attrs)
    index = {d: last.variables[d] for d in last.dims if d in last.variables and d != STEP}
    index[STEP] = xr.Variable((STEP,), np.concatenate([d[STEP].values for d in parts]), last[STEP].attrs)
    coords = [n for n in names if n in last.coords or any(n in d.coords for d in parts)]
    ds = xr.Dataset({n: v for n, v in variables.items() if n not in coords},
                    coords={**index, **{n: variables[n] for n in coords}}, attrs=dict(last.attrs))
    return ds


def _open_files_lazily(files: list[Path]) -> xr.Dataset | None:
    """The files of a store folder as one lazy, not decoded Dataset: one dask array per variable
    whose chunks are the files (a file the writer has since merged or continued is read from the
    file that now holds its steps). Selecting one (layer, module) reads only its chunks; xr.concat of
    per-file dask arrays read 86% of a 10,000-snapshot store for one cell (benchmarks/open_runs.py).
    None when the files do not all hold the same variables (a variable added during the run)."""
    import dask.array as dsa

    for file in files:
        _check_header(file)
    handles = []
    try:
        for file in files:
            try:
                nc = netCDF4.Dataset(file, "r")
            except OSError as err:
                if not file.exists():
                    raise FileNotFoundError(str(file)) from err
                raise StoreError(f"Cannot read run store {file} ({err}); expected a netCDF4 file written by a tracker.") from err
            nc.set_auto_maskandscale(False)
            handles.append(nc)
        last = handles[-1]
        names = set(last.variables)
        if any(set(nc.variables) != names for nc in handles):
            return None
        # note: never open a file through xarray while a netCDF4 handle on it is open: closing one of
        # two handles on a file broke later opens in the process ("NetCDF: HDF error")
        tail = _static_part(last)
        steps = [np.asarray(nc.variables[STEP][:]) for nc in handles]
        lengths = tuple(len(s) for s in steps)
        token = abs(hash(tuple(f"{f}:{f.stat().st_mtime_ns}" for f in files)))
        data = {}
        for name in last.variables:
            raw = last.variables[name]
            dims = tuple(raw.dimensions)
            if STEP not in dims or name in tail.variables:
                continue  # static variables and coordinates: read above
            dtype, attrs_ = _decoded(raw)
            joined = _Joined([_FileVariable(f, name, st) for f, st in zip(files, steps)], dims.index(STEP), lengths,
                             raw.shape, dtype)
            # note: one dask chunk per file and layer: selecting one (layer, module) computes only its
            # layer's chunks (dask does not push the selection into a custom reader's read)
            chunks = tuple(lengths if d == STEP else ((1,) * n if d == "layer" else (max(1, n),))
                           for d, n in zip(dims, joined.shape))
            array = dsa.from_array(joined, chunks=chunks, name=f"perl-store-{token}-{name}",
                                   meta=np.empty((0,) * joined.ndim, dtype=dtype))
            data[name] = (dims, array, attrs_)
        tail = tail.assign({STEP: xr.Variable((STEP,), np.concatenate(steps), tail[STEP].attrs)})
        return tail.assign(data)
    finally:
        for nc in handles:  # note: each read opens its file again (see RunStore.open_stacked)
            nc.close()


def _static_part(nc: netCDF4.Dataset) -> xr.Dataset:
    """What an open store file holds besides its step variables: dimension coordinates (``step``
    included), static variables and attrs, read raw (xr.decode_cf decodes)."""
    variables = {}
    for name, var in nc.variables.items():
        dims = tuple(var.dimensions)
        if STEP in dims and name != STEP:
            continue
        values = var[:]
        values = np.asarray(values, dtype=object) if var.dtype == str else np.asarray(values)
        variables[name] = xr.Variable(dims, values, {k: var.getncattr(k) for k in var.ncattrs()})
    index = {n: v for n, v in variables.items() if v.dims == (n,)}
    rest = {n: v for n, v in variables.items() if n not in index}
    return xr.Dataset(rest, coords=index, attrs={k: nc.getncattr(k) for k in nc.ncattrs()})


class _Joined:
    """The same variable of consecutive store files as one array along ``step`` (for dask)."""

    def __init__(self, variables: list, axis: int, lengths: tuple, shape: tuple, dtype):
        self.variables, self.axis, self.dtype = variables, axis, np.dtype(dtype)
        self.starts = np.cumsum((0, *lengths))
        shape = list(shape)
        shape[axis] = int(self.starts[-1])
        self.shape, self.ndim = tuple(shape), len(shape)

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        key = key + (slice(None),) * (self.ndim - len(key))
        wanted = np.arange(self.shape[self.axis])[key[self.axis]]
        scalar = np.ndim(wanted) == 0
        wanted = np.atleast_1d(wanted)
        file_of = np.searchsorted(self.starts, wanted, side="right") - 1
        pieces = []
        for f in dict.fromkeys(file_of.tolist()):
            sub = list(key)
            sub[self.axis] = _as_slice(wanted[file_of == f] - self.starts[f])
            pieces.append(np.asarray(self.variables[f][tuple(sub)], dtype=self.dtype))
        if not pieces:
            shape = np.broadcast_to(np.empty((), bool), self.shape)[key].shape
            return np.empty(shape, dtype=self.dtype)
        # note: integer keys before the step axis drop dimensions: find where step went
        axis = sum(1 for k in key[: self.axis] if not isinstance(k, (int, np.integer)))
        out = np.concatenate(pieces, axis=axis) if len(pieces) > 1 else pieces[0]
        return np.take(out, 0, axis=axis) if scalar else out


class _FileVariable:
    """One variable of one store file, opened at every read (no handle is held between reads)."""

    def __init__(self, path: Path, name: str, steps: np.ndarray | None = None):
        self.path, self.name, self.steps = path, name, steps

    def __getitem__(self, key):
        from xarray.backends.locks import HDF5_LOCK

        with HDF5_LOCK:
            try:
                with netCDF4.Dataset(self.path, "r") as nc:
                    nc.set_auto_maskandscale(False)
                    return np.asarray(nc.variables[self.name][key])
            except (OSError, RuntimeError) as err:
                if self.steps is None or self.path.exists():
                    raise StoreError(f"Cannot read run store {self.path} ({err}); expected a netCDF4 file written by a tracker.") from err
            # the writer has merged or continued this file since it was listed: read its steps where they are now
            for first, last, path in _parts(self.path.parent):
                if first <= self.steps[0] and self.steps[-1] <= last:
                    with netCDF4.Dataset(path, "r") as nc:
                        nc.set_auto_maskandscale(False)
                        var = nc.variables[self.name]
                        axis = var.dimensions.index(STEP)
                        where = np.searchsorted(np.asarray(nc.variables[STEP][:]), self.steps)
                        key = key if isinstance(key, tuple) else (key,)
                        key = key + (slice(None),) * (len(var.dimensions) - len(key))
                        sub = list(key)
                        sub[axis] = where[key[axis]]
                        if np.ndim(sub[axis]):
                            sub[axis] = _as_slice(sub[axis])
                        return np.asarray(var[tuple(sub)])
        raise StoreError(f"Steps {int(self.steps[0])}..{int(self.steps[-1])} of {self.path.parent} were removed "
                         "(a resume truncated the store); open it again.")


def _decoded(raw) -> tuple[np.dtype, dict]:
    """The dtype and attrs of a stored variable as read (decoded by the reader, not by dask).

    Floats are stored with ``_FillValue = NaN``, so NaN needs no masking; booleans are int8 with
    ``dtype = "bool"``. Decoding in the reader, not as dask operations after it, keeps dask able
    to push a selection into the read (one cell read 640% of a store's bytes otherwise).
    """
    attrs = {k: raw.getncattr(k) for k in raw.ncattrs()}
    fill = attrs.pop("_FillValue", None)
    if fill is not None and not (np.issubdtype(raw.dtype, np.floating) and np.isnan(fill)):
        attrs["_FillValue"] = fill  # a real fill value: left to xr.decode_cf
    if attrs.get("dtype") == "bool":
        attrs.pop("dtype")
        return np.dtype(bool), attrs
    return np.dtype(raw.dtype), attrs


def _as_slice(index: np.ndarray):
    index = np.asarray(index)
    if index.size and np.all(np.diff(index) == 1):
        return slice(int(index[0]), int(index[-1]) + 1)
    return index


class _Stacked:
    """The same variable of several store files as one array with a leading run axis (for dask)."""

    def __init__(self, variables: list, shape: tuple, dtype):
        self.variables, self.dtype = variables, np.dtype(dtype)
        self.shape = (len(variables), *shape)
        self.ndim = len(self.shape)

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        which, rest = key[0], key[1:]
        runs = np.arange(len(self.variables))[which]
        if np.ndim(runs) == 0:
            return np.asarray(self.variables[int(runs)][rest], dtype=self.dtype)
        if not len(runs):
            return np.empty((0, *np.broadcast_to(np.empty((), bool), self.shape[1:])[rest].shape), dtype=self.dtype)
        return np.stack([np.asarray(self.variables[int(i)][rest], dtype=self.dtype) for i in runs])


def _same_layout(nc: netCDF4.Dataset, ref: netCDF4.Dataset, first: xr.Dataset) -> bool:
    """Whether an open file has the variables, dimensions and dtypes of ``ref`` and the coordinate values of ``first``."""
    if set(nc.variables) != set(ref.variables) or set(nc.dimensions) != set(ref.dimensions):
        return False
    if any(len(nc.dimensions[d]) != len(ref.dimensions[d]) for d in ref.dimensions):
        return False
    for name, mine in ref.variables.items():
        other = nc.variables[name]
        if tuple(other.dimensions) != tuple(mine.dimensions) or other.dtype != mine.dtype:
            return False
    for name in first.dims:
        if name in first.variables and nc is not ref:
            var, values = first[name], np.asarray(nc.variables[name][:])
            same = ([str(v) for v in values] == [str(v) for v in var.values] if var.dtype.kind in "OUS"
                    else np.array_equal(values, var.values))
            if not same:
                return False
    return True


def _equal_attr(a, b) -> bool:
    try:
        return bool(np.array_equal(np.asarray(a), np.asarray(b)))
    except Exception:  # noqa: BLE001 - attributes that cannot be compared are treated as different
        return False


def _decode_attrs(ds: xr.Dataset) -> xr.Dataset:
    for name, value in list(ds.attrs.items()):
        # attrs that were dicts on the way in come back as dicts
        if isinstance(value, str) and name.endswith("_json"):
            try:
                ds.attrs[name] = json.loads(value)
            except ValueError:
                pass
    return ds


def _precision_note(ds: xr.Dataset, float32: bool) -> str:
    if float32:
        return ("float32: values computed in float64 from float32 weights, stored as float32 "
                "(relative rounding <= 6e-8 per value); merged and final files compressed losslessly (zlib + shuffle)")
    kinds = {str(ds[n].dtype) for n in ds.data_vars if ds[n].dtype.kind == "f"}
    return f"{', '.join(sorted(kinds)) or 'float64'} as computed; merged and final files compressed losslessly (zlib + shuffle)"


# -------------------------------------------------------------------- file writing
def _block_chunks(var: xr.Variable) -> tuple[int, ...] | None:
    """Small files: one uncompressed chunk of BLOCK steps per variable, filled in place by appends.

    Uncompressed because HDF5 does not reuse the space of a rewritten compressed chunk (the file
    would grow at every append), and per-step compressed chunks made merges slow to read (measured:
    3.8 s to read 32 files). Small files hold at most BLOCK * MERGE snapshots of a store.
    """
    return tuple(BLOCK if d == STEP else max(1, n) for d, n in zip(var.dims, var.shape)) if STEP in var.dims else None


def _cell_chunks(var: xr.Variable) -> tuple[int, ...] | None:
    """Merged and final files: chunks of one (layer, module) cell and ~64 kB of steps."""
    if STEP not in var.dims:
        return None
    rest = [1 if d in _CELL_DIMS else max(1, n) for d, n in zip(var.dims, var.shape) if d != STEP]
    steps = max(1, _CHUNK_BYTES // (var.dtype.itemsize * int(np.prod(rest))))
    steps = min(steps, BLOCK * MERGE)  # note: a chunk longer than a merged file compresses its fill for nothing
    return tuple(steps if d == STEP else (1 if d in _CELL_DIMS else max(1, n)) for d, n in zip(var.dims, var.shape))


# (chunk sizes of a variable, zlib level; 0: uncompressed). Level 1 compresses as well as 4 here (measured)
SMALL = (_block_chunks, 0)
CELL = (_cell_chunks, 1)


def _write_file(path: Path, ds: xr.Dataset, attrs: dict, layout=CELL, replace: bool = True, float32: bool = False) -> None:
    """Create ``path`` holding ``ds`` (step unlimited), via a temporary file and os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp") if replace else path
    try:
        with netCDF4.Dataset(tmp, "w", format="NETCDF4") as nc:
            if STEP in ds.dims or STEP in ds.coords:
                ds = _as_step_dataset(ds)
            nc.createDimension(STEP, None)
            for dim, size in ds.sizes.items():
                if dim != STEP:
                    nc.createDimension(dim, size)
            for name, coord in ds.coords.items():
                if coord.dims == (name,):
                    _create_variable(nc, name, coord.variable, layout)[:] = _encode(coord.values)
            _append_into(nc, ds, layout=layout, start=0, float32=float32)
            _set_global_attrs(nc, attrs)
        if replace:
            _fsync_and_replace(tmp, path)
    finally:
        if replace and tmp.exists():
            tmp.unlink()


def _append_into(nc: netCDF4.Dataset, ds: xr.Dataset, layout=CELL, start: int | None = None, float32: bool = False) -> None:
    """Write ``ds``'s steps, data variables and non-index coordinates at the end of ``step``."""
    n0 = len(nc.dimensions[STEP]) if start is None else start
    n = ds.sizes.get(STEP, 0)
    if STEP not in nc.variables and STEP in ds.variables:
        _create_variable(nc, STEP, ds[STEP].variable, None)
    if n:
        nc.variables[STEP][n0 : n0 + n] = ds[STEP].values.astype(np.int64)
    extra_coords = [c for c in ds.coords if c not in ds.dims]
    for name in [*ds.data_vars, *extra_coords]:
        var = ds[name].variable
        if name not in nc.variables:
            for dim in var.dims:
                if dim not in nc.dimensions:
                    raise StoreError(
                        f"Variable {name!r} uses dimension {dim!r} that the store does not have; "
                        "declare every dimension at the first append."
                    )
            _create_variable(nc, name, var, layout, float32=float32)
        target = nc.variables[name]
        if STEP in var.dims and STEP not in target.dimensions:
            var = var.isel({STEP: -1})  # static in the store: the latest value wins
        values = _encode(var.transpose(*target.dimensions).values)
        if STEP in var.dims:
            if n:
                index = [slice(None)] * len(target.dimensions)
                index[target.dimensions.index(STEP)] = slice(n0, n0 + n)
                target[tuple(index)] = values
        else:
            target[...] = values
    if extra_coords:
        # CF global 'coordinates': xarray reads these back as coordinates, not data variables
        known = set(str(getattr(nc, "coordinates", "")).split())
        nc.setncattr("coordinates", " ".join(sorted(known | set(extra_coords))))


def _create_variable(nc: netCDF4.Dataset, name: str, var: xr.Variable, layout, float32: bool = False):
    kind = var.dtype.kind
    attrs = {k: v for k, v in var.attrs.items() if k != "_FillValue"}
    chunks = layout[0](var) if layout is not None and var.ndim else None
    level = layout[1] if layout else 1
    compressed = {"zlib": True, "shuffle": True, "complevel": level} if var.ndim and level else {}
    if chunks:
        compressed["chunksizes"] = chunks
    if kind in "OUS":
        v = nc.createVariable(name, str, var.dims)
    elif kind == "b":
        v = nc.createVariable(name, "i1", var.dims, **compressed)
        attrs["dtype"] = "bool"  # xarray decodes this back to bool
    elif kind == "f":
        dtype = np.float32 if float32 and var.dtype == np.float64 and name not in nc.dimensions else var.dtype
        v = nc.createVariable(name, dtype, var.dims, fill_value=np.nan, **compressed)
    elif kind in "iu":
        v = nc.createVariable(name, var.dtype, var.dims, **(compressed if name != STEP else {}))
    else:
        raise StoreError(f"Variable {name!r} has dtype {var.dtype}, which the run store cannot hold; use numbers or strings.")
    for key, value in _clean_attrs(attrs).items():
        v.setncattr(key, value)
    return v


def _encode(values: np.ndarray) -> np.ndarray:
    if values.dtype.kind in "US":
        return values.astype(object)
    if values.dtype.kind == "b":
        return values.astype(np.int8)
    return values


def _check_schema(nc: netCDF4.Dataset, ds: xr.Dataset, path: Path) -> None:
    for dim, size in ds.sizes.items():
        if dim == STEP:
            continue
        if dim not in nc.dimensions:
            raise StoreError(
                f"Dimension {dim!r} is not in the store {path}; all dimensions are fixed by the first append."
            )
        if len(nc.dimensions[dim]) != size:
            raise StoreError(
                f"Dimension {dim!r} has size {size} but the store {path} has {len(nc.dimensions[dim])}; "
                "dimensions other than step are fixed by the first append."
            )
        if dim in ds.coords and dim in nc.variables:
            stored = np.asarray(nc.variables[dim][:])
            given = np.asarray(ds[dim].values)
            if stored.dtype.kind in "OUS" or given.dtype.kind in "OUS":
                same = [str(a) for a in stored] == [str(b) for b in given]
            else:
                same = np.array_equal(stored, given)
            if not same:
                raise StoreError(
                    f"Coordinate {dim!r} differs from the store {path} ({[str(g) for g in given[:8]]} vs {[str(t) for t in stored[:8]]}); "
                    "labels are fixed by the first append."
                )


def _as_step_dataset(ds: xr.Dataset) -> xr.Dataset:
    if not isinstance(ds, xr.Dataset):
        raise StoreError(f"RunStore.append expects an xarray.Dataset, got {type(ds).__name__}.")
    if STEP not in ds.dims:
        if STEP not in ds.coords or ds[STEP].ndim != 0:
            raise StoreError("A snapshot needs a 'step' dimension or a scalar 'step' coordinate.")
        ds = ds.expand_dims(STEP)
    if STEP not in ds.coords:
        raise StoreError("The 'step' dimension needs integer coordinate values (the optimizer step).")
    if ds[STEP].dtype.kind not in "iu":
        raise StoreError(f"Step values must be integers, got dtype {ds[STEP].dtype}.")
    return ds


def _clean_attrs(attrs: dict) -> dict[str, Any]:
    """Map attribute values onto what netCDF can hold (see RunStore docstring)."""
    out: dict[str, Any] = {}
    for key, value in attrs.items():
        if value is None:
            continue
        if isinstance(value, (bool, np.bool_)):
            value = int(value)
        elif isinstance(value, dict):
            key = key if key.endswith("_json") else f"{key}_json"
            value = json.dumps(value, default=str, sort_keys=True)
        elif isinstance(value, (list, tuple)):
            items = list(value)
            if not items:
                value = ""
            elif all(isinstance(v, str) for v in items):
                value = items
            elif all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in items):
                value = np.asarray(items)
            else:
                value = json.dumps(items, default=str)
        elif isinstance(value, Path):
            value = str(value)
        elif not isinstance(value, (str, int, float, np.number, np.ndarray)):
            value = str(value)
        out[str(key)] = value
    return out


def _set_global_attrs(nc: netCDF4.Dataset, attrs: dict) -> None:
    for key, value in _clean_attrs(attrs).items():
        nc.setncattr(key, value)


def _read_steps(path: Path) -> list[int]:
    for _ in range(_READ_RETRIES):
        files = [p for _, _, p in _parts(path)] if path.is_dir() else [path]
        steps: list[int] = []
        try:
            for file in files:
                with netCDF4.Dataset(file, "r") as nc:
                    if STEP in nc.variables:
                        steps.extend(int(s) for s in np.asarray(nc.variables[STEP][:]))
            return steps
        except OSError as err:
            if path.is_dir() and not file.exists():
                continue  # a writer replaced the file between listing and opening: list again
            raise StoreError(
                f"Cannot read run store {file} ({err}); expected a netCDF4 file written by a tracker. "
                "Move it away to start a new store."
            ) from err
    raise StoreError(f"The run store {path} changed at every one of {_READ_RETRIES} attempts to read it; try again.")


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _fsync_and_replace(tmp: Path, path: Path) -> None:
    """fsync ``tmp`` (a file or a folder), then rename it over ``path`` and fsync the parent folder."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def _check_header(path: Path) -> None:
    from perl.schema import StoredFileError, check_store_file  # note: readers validate before loading

    try:
        check_store_file(path)
    except StoredFileError as err:
        if not Path(path).exists():  # note: the writer replaced it between listing and reading: list again
            raise FileNotFoundError(str(path)) from None
        raise StoreError(str(err)) from None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

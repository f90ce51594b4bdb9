"""Reading a store's files: listing the files that hold each step once, opening them eagerly or
lazily (without loading every variable), and stacking several runs (see :mod:`.store`)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import netCDF4
import numpy as np
import xarray as xr

from perl.ncfiles import Handle, reading, release

from .store_format import BLOCK, PART, STEP, StoreError


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
    """One store file: loaded into memory, or lazily (dask, chunks of one layer), CF-decoded or raw."""
    ds = _open_files_lazily([path]) if lazy else _load_file(path)
    return xr.decode_cf(ds) if decode else ds


def _load_file(path: Path) -> xr.Dataset:
    """Every variable of a store file in memory, raw (not CF-decoded); the file is not held open."""
    with _checked(path, keep=False) as handle:
        nc = handle.nc
        ds = _static_part(nc)
        data = {}
        for name, var in nc.variables.items():
            if name not in ds.variables:
                dtype, attrs = _decoded(var)
                data[name] = xr.Variable(tuple(var.dimensions), np.asarray(var[...], dtype=dtype), attrs)
        return ds.assign(data)


@contextmanager
def _checked(path: Path, opened: tuple | None = None, keep: bool = True) -> Iterator[Handle]:
    """The shared handle on a store file whose header passed `perl.schema.check_store_file`
    (checked once while it is open). netCDF4/HDF5's errors on a damaged file, opening it or in the
    body, become one StoreError naming it; FileNotFoundError when it is gone (the writer replaced it)."""
    from perl.schema import StoredFileError, check_store_handle

    try:
        with reading(path, opened, keep=keep) as handle:
            check_store_handle(handle)
            yield handle
    except (FileNotFoundError, StoreError):
        raise
    except StoredFileError as err:
        if not path.exists():  # note: the writer replaced it between listing and reading: list again
            raise FileNotFoundError(str(path)) from None
        raise StoreError(str(err)) from None
    except Exception as err:  # noqa: BLE001 - netCDF4/HDF5 raise many types for a damaged file
        if not path.exists():  # note: HDF5 reports a file removed while it opened it as an "HDF error"
            raise FileNotFoundError(str(path)) from err
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise StoreError(
            f"Cannot read run store {path} ({reason}); expected a netCDF4 file written by a tracker."
        ) from err


def _combine(parts: list[xr.Dataset]) -> xr.Dataset:
    """Files of one store as one Dataset: step variables concatenated, static ones from the last file."""
    if len(parts) == 1:
        return parts[0]
    last = parts[-1]
    static = [name for name in last.data_vars if STEP not in last[name].dims]
    stepped = [ds.drop_vars([n for n in ds.data_vars if STEP not in ds[n].dims]) for ds in parts]
    combined = xr.concat(
        stepped,
        dim=STEP,
        data_vars="minimal",
        coords="minimal",
        compat="override",
        join="override",
        combine_attrs="override",
    )
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
    ds = xr.Dataset(
        {n: v for n, v in variables.items() if n not in coords},
        coords={**index, **{n: variables[n] for n in coords}},
        attrs=dict(last.attrs),
    )
    return ds


def _open_files_lazily(files: list[Path]) -> xr.Dataset | None:
    """The files of a store as one lazy, not decoded Dataset: one dask array per variable whose
    chunks are the files (each read through the file's shared handle, see :mod:`perl.ncfiles`; a
    file the writer has since merged or continued is still read as it was listed). Selecting one
    (layer, module) reads only its layer's chunks; xr.concat of per-file dask arrays read 86% of a
    10,000-snapshot store for one cell (benchmarks/open_runs.py). None when the files do not all
    hold the same variables (a variable added during the run)."""
    import dask.array as dsa

    tails, steps, identities, names = [], [], [], None
    for file in files:
        with _checked(file) as handle:
            nc = handle.nc
            if names is None:
                names = set(nc.variables)
            elif set(nc.variables) != names:
                return None
            steps.append(np.asarray(nc.variables[STEP][:]))
            identities.append(handle.identity)
            if file is files[-1]:
                tails.append(_static_part(nc))
                raws = {name: (tuple(var.dimensions), var.shape, *_decoded(var)) for name, var in nc.variables.items()}
    tail = tails[0]
    lengths = tuple(len(s) for s in steps)
    token = abs(hash(tuple(identities)))
    data = {}
    for name, (dims, shape, dtype, attrs_) in raws.items():
        if STEP not in dims or name in tail.variables:
            continue  # static variables and coordinates: read above
        joined = _Joined(
            [_FileVariable(f, name, st, ident) for f, st, ident in zip(files, steps, identities)],
            dims.index(STEP),
            lengths,
            shape,
            dtype,
        )
        # note: one dask chunk per file and layer: selecting one (layer, module) computes only its
        # layer's chunks (dask does not push the selection into a custom reader's read)
        chunks = tuple(
            lengths if d == STEP else ((1,) * n if d == "layer" else (max(1, n),)) for d, n in zip(dims, joined.shape)
        )
        array = dsa.from_array(
            joined,
            chunks=chunks,
            name=f"perl-store-{token}-{name}",
            meta=np.empty((0,) * joined.ndim, dtype=dtype),
        )
        data[name] = (dims, array, attrs_)
    tail = tail.assign({STEP: xr.Variable((STEP,), np.concatenate(steps), tail[STEP].attrs)})
    ds = tail.assign(data)
    ds.set_close(partial(release, identities))  # note: ds.close() closes its files (a later read opens them again)
    return ds


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
    """One variable of one store file, read through the file's shared handle (:mod:`perl.ncfiles`).

    ``opened`` is the file's identity when the Dataset was built: its handle reads the file as it
    was then, even after the writer merged or continued it. When that handle was closed since (more
    files were read than stay open), the steps are read from the file that holds them now.
    """

    def __init__(self, path: Path, name: str, steps: np.ndarray | None = None, opened: tuple | None = None):
        self.path, self.name, self.steps, self.opened = path, name, steps, opened

    def __getitem__(self, key):
        try:
            return self._read(self.path, key, self.opened)
        except FileNotFoundError:
            if self.steps is None:
                raise StoreError(f"The run store file {self.path} was removed; open the run again.") from None
        for first, last, path in _parts(self.path.parent):
            if first <= self.steps[0] and self.steps[-1] <= last:
                return self._read(path, key, None, self.steps)
        raise StoreError(
            f"Steps {int(self.steps[0])}..{int(self.steps[-1])} of {self.path.parent} were removed "
            "(a resume truncated the store); open it again."
        )

    def _read(self, path: Path, key, opened, steps=None):
        with _checked(path, opened) as handle:
            var = handle.nc.variables[self.name]
            if steps is not None:  # this file holds more steps than the one listed: find ours in it
                axis = var.dimensions.index(STEP)
                where = np.searchsorted(np.asarray(handle.nc.variables[STEP][:]), steps)
                key = key if isinstance(key, tuple) else (key,)
                key = list(key + (slice(None),) * (len(var.dimensions) - len(key)))
                key[axis] = where[key[axis]]
                if np.ndim(key[axis]):
                    key[axis] = _as_slice(key[axis])
                key = tuple(key)
            return np.asarray(var[key])


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


def _layout(nc: netCDF4.Dataset) -> tuple[dict, dict]:
    """What `_same_layout` compares: dimension sizes, and each variable's dimensions and dtype."""
    dims = {name: len(d) for name, d in nc.dimensions.items()}
    return dims, {name: (tuple(var.dimensions), var.dtype) for name, var in nc.variables.items()}


def _same_layout(nc: netCDF4.Dataset, layout: tuple[dict, dict], first: xr.Dataset) -> bool:
    """Whether an open file has the `_layout` of the first file and the coordinate values of ``first``."""
    if _layout(nc) != layout:
        return False
    for name in first.dims:
        if name in first.variables:
            var, values = first[name], np.asarray(nc.variables[name][:])
            same = (
                [str(v) for v in values] == [str(v) for v in var.values]
                if var.dtype.kind in "OUS"
                else np.array_equal(values, var.values)
            )
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
        return (
            "float32: values computed in float64 from float32 weights, stored as float32 "
            "(relative rounding <= 6e-8 per value); merged and final files compressed losslessly (zlib + shuffle)"
        )
    kinds = {str(ds[n].dtype) for n in ds.data_vars if ds[n].dtype.kind == "f"}
    return f"{', '.join(sorted(kinds)) or 'float64'} as computed; merged and final files compressed losslessly (zlib + shuffle)"

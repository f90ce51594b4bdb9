"""Reading a store's files: listing the files that hold each step once, opening them eagerly or
lazily (without loading every variable), and stacking several runs (see :mod:`.store`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import netCDF4
import numpy as np
import xarray as xr

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
                raise StoreError(
                    f"Cannot read run store {file} ({err}); expected a netCDF4 file written by a tracker."
                ) from err
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
            joined = _Joined(
                [_FileVariable(f, name, st) for f, st in zip(files, steps)],
                dims.index(STEP),
                lengths,
                raw.shape,
                dtype,
            )
            # note: one dask chunk per file and layer: selecting one (layer, module) computes only its
            # layer's chunks (dask does not push the selection into a custom reader's read)
            chunks = tuple(
                lengths if d == STEP else ((1,) * n if d == "layer" else (max(1, n),))
                for d, n in zip(dims, joined.shape)
            )
            array = dsa.from_array(
                joined,
                chunks=chunks,
                name=f"perl-store-{token}-{name}",
                meta=np.empty((0,) * joined.ndim, dtype=dtype),
            )
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
                    raise StoreError(
                        f"Cannot read run store {self.path} ({err}); expected a netCDF4 file written by a tracker."
                    ) from err
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
        raise StoreError(
            f"Steps {int(self.steps[0])}..{int(self.steps[-1])} of {self.path.parent} were removed "
            "(a resume truncated the store); open it again."
        )


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


def _check_header(path: Path) -> None:
    from perl.schema import StoredFileError, check_store_file  # note: readers validate before loading

    try:
        check_store_file(path)
    except StoredFileError as err:
        if not Path(path).exists():  # note: the writer replaced it between listing and reading: list again
            raise FileNotFoundError(str(path)) from None
        raise StoreError(str(err)) from None

"""Writing a store's files: creating, appending into and merging netCDF files under a temporary name,
then fsync and rename; schema checks and attribute cleaning (see :mod:`.store`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import netCDF4
import numpy as np
import xarray as xr

from perl.ncfiles import locked, reading

from .store_format import _CELL_DIMS, _CHUNK_BYTES, _READ_RETRIES, BLOCK, MERGE, STEP, StoreError
from .store_read import _parts


# -------------------------------------------------------------------- file writing
def _block_chunks(var: xr.Variable) -> tuple[int, ...] | None:
    """Small files: uncompressed chunks of BLOCK steps and one layer, filled in place by appends.

    Uncompressed because HDF5 does not reuse the space of a rewritten compressed chunk (the file
    would grow at every append), and per-step compressed chunks made merges slow to read (measured:
    3.8 s to read 32 files). One layer per chunk: a reader of one (layer, module) history of a live
    10,000-snapshot store read 46 MB with one chunk per variable, 6.7 MB so; appends cost ~7% more
    (benchmarks/open_runs.py, store_append.py). Small files hold at most BLOCK * MERGE snapshots.
    """
    if STEP not in var.dims:
        return None
    return tuple(BLOCK if d == STEP else (1 if d == "layer" else max(1, n)) for d, n in zip(var.dims, var.shape))


def _cell_chunks(var: xr.Variable) -> tuple[int, ...] | None:
    """Merged and final files: chunks of one (layer, module) cell and ~64 kB of steps."""
    if STEP not in var.dims:
        return None
    rest = [1 if d in _CELL_DIMS else max(1, n) for d, n in zip(var.dims, var.shape) if d != STEP]
    steps = max(1, _CHUNK_BYTES // (var.dtype.itemsize * int(np.prod(rest))))
    steps = min(steps, BLOCK * MERGE)  # note: a chunk longer than a merged file compresses its fill for nothing
    return tuple(steps if d == STEP else (1 if d in _CELL_DIMS else max(1, n)) for d, n in zip(var.dims, var.shape))


# (chunk sizes of a variable, zlib level; 0: uncompressed). Level 1 compresses as well as 4 here (measured)
SMALL = (_block_chunks, 0)  # the newest small file, filled in place
FULL = (_block_chunks, 1)  # a small file once full: never written again, so compressed
CELL = (_cell_chunks, 1)


def _write_file(
    path: Path, ds: xr.Dataset, attrs: dict, layout=CELL, replace: bool = True, float32: bool = False
) -> None:
    """Create ``path`` holding ``ds`` (step unlimited), via a temporary file and os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp") if replace else path
    try:
        with locked(), netCDF4.Dataset(tmp, "w", format="NETCDF4") as nc:
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


def _append_into(
    nc: netCDF4.Dataset, ds: xr.Dataset, layout=CELL, start: int | None = None, float32: bool = False
) -> None:
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
        raise StoreError(
            f"Variable {name!r} has dtype {var.dtype}, which the run store cannot hold; use numbers or strings."
        )
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
                with reading(file, keep=False) as handle:
                    if STEP in handle.nc.variables:
                        steps.extend(int(s) for s in np.asarray(handle.nc.variables[STEP][:]))
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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

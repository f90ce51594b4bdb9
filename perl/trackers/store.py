"""The run store: one growing netCDF file per tracker, crash-safe and readable while it grows.

This is the one module that knows netCDF. A tracker hands it one labelled ``xr.Dataset`` per
snapshot; the store appends it along the unlimited ``step`` dimension.

Why atomic replacement: HDF5 (under netCDF4) does not support a reader and a writer on the same
file at the same time, and a process killed mid-write can leave an unreadable file. So every
append copies the store to a temporary file in the same folder, appends there, closes, fsyncs and
``os.replace``s it over the store. A reader holding the old file keeps a consistent view (POSIX
keeps the old inode alive); a new reader sees the new, complete file; SIGKILL at any moment
leaves the last complete file. Nothing is kept in memory between appends except the list of
stored step numbers, so memory does not grow with the number of steps. The price is one file copy
per append (a few MB for a 1.5B model after thousands of snapshots).

Schema rules:
- ``step`` is the only growing dimension; every other dimension (``layer``, ``module``, ``sv``,
  ...) and its coordinate values are fixed by the first append. A later append with other sizes
  or labels is refused with a clear error.
- Trackers declare every variable at the first append (NaN-filled where a quantity does not
  exist yet). A variable that first appears in a later append is still accepted: it is added
  then, and earlier steps read NaN (its ``_FillValue``). A variable missing from an append reads
  NaN at that step.
- NaN and Inf are stored as they are. Floating variables have ``_FillValue = NaN``.
- Variables without a ``step`` dimension are static: written at every append (last wins).
- Strings (coordinates such as ``module``, ``component``) are netCDF variable-length strings.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import netCDF4
import numpy as np
import xarray as xr

__all__ = ["RunStore", "StoreError"]

STEP = "step"


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

    Args:
        path (str | Path): the store file. Created (with its folder) at the first append; an
            existing file is continued (resume).
        attrs (dict, optional): global attributes written into the file at every append, merged
            over the appended Dataset's own attrs. Values may be str, numbers, lists of numbers
            or strings; dicts are stored as JSON, bools as 0/1, None is skipped.
    """

    def __init__(self, path: str | os.PathLike, attrs: dict | None = None):
        self.path = Path(path)
        self.attrs = dict(attrs or {})
        self._steps: list[int] = _read_steps(self.path) if self.path.exists() else []
        self._remove_stale_temporaries()

    # ---------------------------------------------------------------- reading
    @property
    def steps(self) -> list[int]:
        """The step numbers stored so far, in order."""
        return list(self._steps)

    def read(self) -> xr.Dataset:
        """The whole store, loaded into memory (file closed). Empty Dataset if nothing stored."""
        if not self.path.exists():
            return xr.Dataset(attrs=_clean_attrs(self.attrs))
        return RunStore.open(self.path)

    @staticmethod
    def open(path: str | os.PathLike) -> xr.Dataset:
        """Read a store (live or final) into memory and close the file at once.

        Closing at once matters: the writer replaces the file after every append, and a reader
        must not hold HDF5 handles longer than needed.

        Args:
            path (str | Path): a ``.nc`` file written by a RunStore.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"No run store at {path}: expected a .nc file written by a tracker; check the run folder.")
        _check_header(path)
        try:
            with xr.open_dataset(path, engine="netcdf4", cache=False) as ds:
                loaded = ds.load()
        except OSError as err:
            raise StoreError(f"Cannot read run store {path} ({err}); expected a netCDF4 file written by a tracker.") from err
        for name, value in list(loaded.attrs.items()):
            # attrs that were dicts on the way in come back as dicts
            if isinstance(value, str) and name.endswith("_json"):
                try:
                    loaded.attrs[name] = json.loads(value)
                except ValueError:
                    pass
        return loaded

    # ---------------------------------------------------------------- writing
    def append(self, ds: xr.Dataset) -> None:
        """Append one snapshot (or several consecutive steps) to the store, atomically.

        Args:
            ds (xr.Dataset): has a ``step`` dimension (or a scalar ``step`` coordinate, which
                gives every data variable a step dimension) whose values are all greater than the
                last stored step; every other dimension matches the store's.
        """
        ds = _as_step_dataset(ds)
        new_steps = [int(s) for s in ds[STEP].values]
        if any(b <= a for a, b in zip(new_steps, new_steps[1:])):
            raise StoreError(f"Steps to append must increase, got {new_steps}.")
        if self._steps and new_steps and new_steps[0] <= self._steps[-1]:
            raise StoreError(
                f"Step {new_steps[0]} is not after the last stored step {self._steps[-1]} in {self.path}; "
                f"call truncate_after({new_steps[0] - 1}) first when resuming from an earlier checkpoint."
            )
        attrs = {**ds.attrs, **self.attrs}
        if not self.path.exists():
            self._write_new(ds, attrs)
        else:
            tmp = self._temporary()
            try:
                shutil.copyfile(self.path, tmp)
                with netCDF4.Dataset(tmp, "a") as nc:
                    _check_schema(nc, ds, self.path)
                    _append_into(nc, ds)
                    _set_global_attrs(nc, attrs)
                _fsync_and_replace(tmp, self.path)
            finally:
                if tmp.exists():
                    tmp.unlink()
        self._steps.extend(new_steps)

    def truncate_after(self, step: int) -> None:
        """Drop every stored step greater than ``step`` (resume from checkpoint-``step``).

        Args:
            step (int): the last step to keep.
        """
        if not self.path.exists() or not self._steps or self._steps[-1] <= step:
            return
        ds = RunStore.open(self.path)
        ds = ds.isel({STEP: np.flatnonzero(ds[STEP].values <= step)})
        self._write_new(ds, ds.attrs)
        self._steps = [s for s in self._steps if s <= step]

    def clear(self) -> None:
        """Delete the store (a new run reusing the folder); the next append starts a new schema."""
        self.path.unlink(missing_ok=True)
        self._steps = []

    def finalize(self, final_path: str | os.PathLike) -> Path:
        """Write the whole store as one consolidated, compressed file (atomic too).

        Args:
            final_path (str | Path): destination, e.g. ``<run>/spectral_history_final.nc``.
        """
        final_path = Path(final_path)
        ds = self.read()
        _write_file(final_path, ds, {**ds.attrs, **self.attrs}, compress=True)
        return final_path

    # ---------------------------------------------------------------- helpers
    def _temporary(self) -> Path:
        return self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")

    def _write_new(self, ds: xr.Dataset, attrs: dict) -> None:
        _write_file(self.path, ds, attrs, compress=False)

    def _remove_stale_temporaries(self) -> None:
        # a writer killed mid-append leaves its temporary behind; the store itself is intact
        if not self.path.parent.is_dir():
            return
        for tmp in self.path.parent.glob(f".{self.path.name}.*.tmp"):
            pid = tmp.name[len(self.path.name) + 2 : -4]
            if pid.isdigit() and not _pid_alive(int(pid)):
                tmp.unlink(missing_ok=True)


# -------------------------------------------------------------------- file writing
def _write_file(path: Path, ds: xr.Dataset, attrs: dict, compress: bool) -> None:
    """Create ``path`` holding ``ds`` (step unlimited), via a temporary file and os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
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
                    _create_variable(nc, name, coord, compress)[:] = _encode(coord.values)
            _append_into(nc, ds, compress=compress, start=0)
            _set_global_attrs(nc, attrs)
        _fsync_and_replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _append_into(nc: netCDF4.Dataset, ds: xr.Dataset, compress: bool = False, start: int | None = None) -> None:
    """Write ``ds``'s steps, data variables and non-index coordinates at the end of ``step``."""
    n0 = len(nc.dimensions[STEP]) if start is None else start
    n = ds.sizes.get(STEP, 0)
    if STEP not in nc.variables and STEP in ds.variables:
        _create_variable(nc, STEP, ds[STEP].variable, compress)
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
            _create_variable(nc, name, var, compress)
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


def _create_variable(nc: netCDF4.Dataset, name: str, var: xr.DataArray, compress: bool):
    kind = var.dtype.kind
    attrs = {k: v for k, v in var.attrs.items() if k != "_FillValue"}
    if kind in "OUS":
        v = nc.createVariable(name, str, var.dims)
    elif kind == "b":
        v = nc.createVariable(name, "i1", var.dims, zlib=compress)
        attrs["dtype"] = "bool"  # xarray decodes this back to bool
    elif kind == "f":
        v = nc.createVariable(name, var.dtype, var.dims, zlib=compress, fill_value=np.nan)
    elif kind in "iu":
        v = nc.createVariable(name, var.dtype, var.dims, zlib=compress)
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
    try:
        with netCDF4.Dataset(path, "r") as nc:
            if STEP not in nc.variables:
                return []
            return [int(s) for s in np.asarray(nc.variables[STEP][:])]
    except OSError as err:
        raise StoreError(
            f"Cannot read run store {path} ({err}); expected a netCDF4 file written by a tracker. "
            "Move it away to start a new store."
        ) from err


def _fsync_and_replace(tmp: Path, path: Path) -> None:
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
        raise StoreError(str(err)) from None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

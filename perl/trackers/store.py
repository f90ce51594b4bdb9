"""The run store: a folder of small netCDF files per tracker, crash-safe and readable while it grows.

This is the one module that knows netCDF. A tracker hands it one labelled ``xr.Dataset`` per
snapshot; the store keeps them along the ``step`` dimension.

Layout. The live store (``spectral_logs/spectral_history.nc``) is a folder of netCDF files named
``steps_<first>_<last>.nc``, each a complete, self-describing netCDF file (dims, coordinates,
attrs) holding a run of consecutive snapshots:

- the newest file holds the last < ``BLOCK`` snapshots; an append copies it (at most ``BLOCK``
  snapshots, a few MB at 1.5B shapes), appends to the copy, fsyncs it and renames it into place
  under its new name, then removes the old one. The append that fills it to ``BLOCK`` snapshots
  writes it compressed instead (it is never written again), and the next append starts a new file;
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
(layer, module) cell, full small files in chunks of one layer; the newest small file is not
compressed (appends fill its chunks of one layer in place; HDF5 would not reuse the space of a
rewritten compressed chunk). A store created with
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
import os
import shutil
from functools import partial
from pathlib import Path

import netCDF4
import numpy as np
import xarray as xr

from perl.ncfiles import locked, reading, release

from .store_format import _READ_RETRIES, BLOCK, MERGE, PART, STEP, StoreError
from .store_read import (
    _checked,
    _combine,
    _decode_attrs,
    _decoded,
    _equal_attr,
    _FileVariable,
    _layout,
    _n_steps_hint,
    _open_file,
    _open_files_lazily,
    _parts,
    _precision_note,
    _same_layout,
    _stack,
    _Stacked,
    _static_part,
)
from .store_write import (
    CELL,
    FULL,
    SMALL,
    _append_into,
    _as_step_dataset,
    _check_schema,
    _clean_attrs,
    _fsync_and_replace,
    _pid_alive,
    _read_steps,
    _set_global_attrs,
    _unlink_quietly,
    _write_file,
)

__all__ = ["RunStore", "StoreError", "BLOCK", "MERGE"]


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
        returns dask-backed variables read by file and layer through shared handles that stay
        open until ``ds.close()`` (:mod:`perl.ncfiles`); a file the writer has merged or continued
        since is read as it was opened (or, its handle closed, where its steps are now).

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
                    raise FileNotFoundError(
                        f"The run store {path} holds no snapshots yet (no steps_*.nc files); "
                        "check the run folder, or wait for the first snapshot."
                    )
                try:
                    if lazy:
                        joined = _open_files_lazily(files)
                        if joined is not None:
                            return _decode_attrs(xr.decode_cf(joined) if decode else joined)
                    parts = [_open_file(p, lazy=lazy and _n_steps_hint(p) > BLOCK, decode=decode) for p in files]
                except FileNotFoundError:
                    continue  # the writer replaced a file between listing and opening: list again
                return _decode_attrs(_combine(parts))
            raise StoreError(
                f"The run store {path} changed at every one of {_READ_RETRIES} attempts to read it; try again."
            )
        if not path.is_file():
            raise FileNotFoundError(
                f"No run store at {path}: expected a store folder or a .nc file written by a tracker; "
                "check the run folder."
            )
        return _decode_attrs(_open_file(path, lazy=lazy, decode=decode))

    @staticmethod
    def open_stacked(paths: list, dim: str = "run") -> xr.Dataset | None:
        """Single-file stores of one layout (a sweep's final files) stacked along ``dim``, lazily, not decoded.

        Files are read through netCDF4's shared handles (:mod:`perl.ncfiles`), their variables
        wrapped in dask arrays directly: opening 100 files through xarray took ~0.3 s each on 2
        busy cores, this ~0.03 s (benchmarks/open_runs.py). Returns None when a path is a store folder or a
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
        first, attrs, identities = None, {}, []
        for path in paths:
            with _checked(path) as handle:  # note: shared handles, kept open for the reads (perl.ncfiles)
                nc = handle.nc
                if first is None:
                    layout = _layout(nc)
                    first = _static_part(nc)  # coordinates, static variables, attrs (raw)
                    attrs = dict(first.attrs)
                    raws = {name: (var.shape, var.dimensions, *_decoded(var)) for name, var in nc.variables.items()}
                elif not _same_layout(nc, layout, first):
                    return None
                attrs = {k: v for k, v in attrs.items() if k in nc.ncattrs() and _equal_attr(nc.getncattr(k), v)}
                identities.append(handle.identity)
        token = "-".join(map(str, identities))
        data = {}
        for name, (shape, dims, dtype, attrs_) in raws.items():
            if name in first.coords:
                continue  # dimension coordinates: the first file's (checked equal in every file)
            stacked = _Stacked([_FileVariable(p, name, opened=i) for p, i in zip(paths, identities)], shape, dtype)
            chunks = (1, *(max(1, n) for n in shape))
            array = dsa.from_array(
                stacked,
                chunks=chunks,
                name=f"perl-stacked-{abs(hash(token))}-{name}",
                meta=np.empty((0,) * stacked.ndim, dtype=dtype),
            )
            data[name] = ((dim, *dims), array, attrs_)
        stacked_ds = first.assign(data)
        stacked_ds.attrs = attrs
        stacked_ds.set_close(partial(release, identities))
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
            with reading(last[2], keep=False) as handle:
                _check_schema(handle.nc, ds, self.path)
                previous = {k: handle.nc.getncattr(k) for k in handle.nc.ncattrs() if k != "coordinates"}
        attrs = {**previous, **ds.attrs, **self.attrs}  # global attrs accumulate, the latest value wins
        if last is not None and held + len(new_steps) <= BLOCK:
            # continue the newest small file: copy it (at most BLOCK snapshots), append to the copy (one
            # chunk per step: nothing already written is rewritten), rename it in under its new name
            tmp = self._temporary()
            try:
                shutil.copyfile(last[2], tmp)
                with locked(), netCDF4.Dataset(tmp, "a") as nc:
                    _append_into(nc, ds, layout=SMALL, float32=self.float32)
                    _set_global_attrs(nc, attrs)
                if held + len(new_steps) < BLOCK:
                    _fsync_and_replace(tmp, self._name(last[0], new_steps[-1]))
                else:  # full: it is never written again, so it is written once more, compressed
                    _write_file(self._name(last[0], new_steps[-1]), _open_file(tmp, lazy=False), attrs, layout=FULL)
            finally:
                tmp.unlink(missing_ok=True)
            _unlink_quietly(last[2])
        elif staging is not None:
            # the first file is written in a hidden folder renamed into place: a store that exists has a snapshot
            name = staging / self._name(new_steps[0], new_steps[-1]).name
            _write_file(name, ds, attrs, layout=SMALL if len(new_steps) < BLOCK else FULL, float32=self.float32)
            _fsync_and_replace(staging, self.path)
        else:
            layout = SMALL if len(new_steps) < BLOCK else FULL
            _write_file(self._name(new_steps[0], new_steps[-1]), ds, attrs, layout=layout, float32=self.float32)
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
                    with locked(), netCDF4.Dataset(tmp, "a") as nc:
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

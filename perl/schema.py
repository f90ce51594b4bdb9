"""What a run's stored files must look like, checked before a reader trusts them.

Readers (`perl.open_run`, `perl.open_runs`, a tracker's ``.load()``, `perlwb report`, the notebooks)
call these before loading anything: a file that is not what the run's writer makes is refused
with one line naming the file and the problem, instead of a raw exception deep in xarray or a
silent partial result. A netCDF file is judged by its header first (dimensions, variables, the
size each declares), so a 6 kB file declaring a 149 GiB variable is refused without allocating.

Usage:
    >>> from perl.schema import check_store_file, check_metrics_step
    >>> check_store_file("runs/demo/spectral_history_final.nc")     # StoredFileError if bad
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = [
    "StoredFileError",
    "check_store_file",
    "check_store_handle",
    "check_metrics_step",
    "MAX_STORE_BYTES",
    "MAX_METRICS_BYTES",
    "MAX_STEP",
]

# note: a tracker store of a 1.5B model after thousands of snapshots is tens of MB; a store that
# declares more than this is not one we wrote (or cannot be loaded into memory on a laptop).
MAX_STORE_BYTES = 4 * 2**30
MAX_METRICS_BYTES = 512 * 2**20
# note: the largest step a float64 holds exactly; larger "steps" are not optimizer steps
MAX_STEP = 2**53
STEP = "step"
# dimensions every tracker store has, and those some have (labels may be absent for these)
_REQUIRED_DIMS = ("step", "layer", "module")
_KNOWN_DIMS = {"step", "layer", "module", "sv", "sv_update", "component", "angle", "intruder_sv", "base_sv"}
_EXPECTED = "expected a netCDF store written by a perl tracker"
_STRING_BYTES = 64  # note: an estimate per variable-length string element


class StoredFileError(ValueError):
    """A run's stored file that is not what its writer makes; the message names the file."""


def check_store_file(path: str | os.PathLike) -> None:
    """Refuse ``path`` unless its header is that of a tracker store of a sane size.

    Checks, reading only the header and the ``step`` coordinate: a netCDF4 file; dimensions
    ``step``, ``layer``, ``module``; every variable over known or labelled dimensions with a
    number or string type; the bytes all variables declare at most `MAX_STORE_BYTES`; step
    values integers in [0, 2**53], strictly increasing.

    Raises:
        StoredFileError: the first problem, in one sentence naming the file.
    """
    from perl.ncfiles import reading

    path = Path(path)
    try:
        with reading(path, keep=False) as handle:
            check_store_handle(handle)
    except StoredFileError:
        raise
    except FileNotFoundError:
        raise StoredFileError(f"{path} disappeared while reading; read the run again.") from None
    except Exception as err:  # noqa: BLE001 - netCDF4/HDF5 raise many types for a damaged file
        raise StoredFileError(f"Cannot read {path} as a netCDF store ({_reason(err)}); {_EXPECTED}.") from None


def check_store_handle(handle) -> None:
    """`check_store_file` on an open `perl.ncfiles.Handle`; once per file while it stays open (an
    open file cannot change under its handle)."""
    if handle.checked:
        return
    try:
        _check_open_file(handle.nc, handle.path)
    except StoredFileError:
        raise
    except Exception as err:  # noqa: BLE001 - netCDF4/HDF5 raise many types for a damaged file
        raise StoredFileError(f"Cannot read {handle.path} as a netCDF store ({_reason(err)}); {_EXPECTED}.") from None
    handle.checked = True


def _reason(err: Exception) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0][:200]


def _check_open_file(nc, path: Path) -> None:
    """`check_store_file` on an open netCDF4 Dataset."""
    expected = _EXPECTED
    dims = {name: len(d) for name, d in nc.dimensions.items()}
    missing = [d for d in _REQUIRED_DIMS if d not in dims]
    if missing:
        raise StoredFileError(
            f"{path} has no {', '.join(missing)} dimension (it has {', '.join(dims) or 'none'}); {expected}."
        )
    labelled = {name for name in dims if name in nc.variables}
    declared = 0
    for name, var in nc.variables.items():
        bad_dims = [d for d in var.dimensions if d not in _KNOWN_DIMS and d not in labelled]
        if bad_dims:
            raise StoredFileError(
                f"{path}: variable {name!r} is over dimension {bad_dims[0]!r}, which no tracker store has; {expected}."
            )
        kind = np.dtype(var.dtype).kind if var.dtype is not str else "O"
        if kind not in "fiuO" and not (kind == "S" and name in labelled):
            raise StoredFileError(f"{path}: variable {name!r} has type {var.dtype}, not numbers; {expected}.")
        count = int(np.prod([dims[d] for d in var.dimensions], dtype=object)) if var.dimensions else 1
        declared += count * (_STRING_BYTES if kind in "OS" else np.dtype(var.dtype).itemsize)
        if declared > MAX_STORE_BYTES:
            raise StoredFileError(
                f"{path} declares more than {MAX_STORE_BYTES // 2**30} GiB of data (variable {name!r} alone: "
                f"{count} values), more than any tracker store holds; {expected}."
            )
    step = nc.variables.get(STEP)
    if step is None or step.dimensions != (STEP,) or np.dtype(step.dtype).kind not in "iu":
        raise StoredFileError(f"{path} has no integer 'step' coordinate; {expected}.")
    steps = np.asarray(step[:])
    if np.ma.isMaskedArray(steps) and np.ma.getmaskarray(steps).any():
        raise StoredFileError(f"{path} has missing 'step' values; {expected}.")
    steps = np.asarray(steps, dtype=np.int64)
    if steps.size and (steps.min() < 0 or steps.max() > MAX_STEP or np.any(np.diff(steps) <= 0)):
        raise StoredFileError(
            f"{path}: its steps are not increasing optimizer steps in [0, 2**53] "
            f"(first {steps[:3].tolist()}); {expected}."
        )


def check_metrics_step(value) -> int:
    """A metrics line's ``step`` as an int; ValueError unless an integer in [0, 2**53]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("step is not a number")
    if isinstance(value, float) and not (value.is_integer() and 0 <= value <= MAX_STEP):
        raise ValueError("step is not an integer in range")
    if not 0 <= value <= MAX_STEP:
        raise ValueError("step out of range")
    return int(value)

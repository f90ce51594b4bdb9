"""Reading the files of a run folder: stores, metrics.jsonl, config.yaml; each checked before it is loaded.

`perl.run` builds `Run` and `Runs` on these; every function raises `RunError` in one sentence for a
file that cannot be read.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import xarray as xr

LOAD_BYTES = (
    32 << 20
)  # stores smaller than this are read into memory at once; larger ones stay lazy (measured: 112 MB took 3.6 s to load)

# units of the Trainer's logged values that are not dimensionless
_METRIC_UNITS = {
    "completions/mean_length": "tokens",
    "completions/min_length": "tokens",
    "completions/max_length": "tokens",
    "completions/mean_terminated_length": "tokens",
    "completions/min_terminated_length": "tokens",
    "completions/max_terminated_length": "tokens",
    "num_tokens": "tokens",
    "train_runtime": "s",
    "epoch": "epochs",
}


class RunError(ValueError):
    """A run folder or one of its files that cannot be read."""


def metric_name(key: str) -> str:
    """The variable name of a Trainer log key in `Run.metrics`: ``/`` (illegal in netCDF) becomes ``.``.

    Usage:
        >>> metric_name("rewards/format_reward/mean")
        'rewards.format_reward.mean'
    """
    return str(key).strip().replace("/", ".")


# ---------------------------------------------------------------------- reading files
def read_store(path: Path, lazy: bool | None = None, decode: bool = True) -> xr.Dataset:
    """A tracker store (live folder or final netCDF file) via `RunStore.open`; `RunError` if unreadable.

    ``lazy=None`` (default) reads a small store (under ``LOAD_BYTES / 2`` on disk) into memory at
    once and opens a larger one lazily, so a 10,000-snapshot run opens in under a second and a
    selection reads only its own chunks. ``perl.trackers.store`` imports no torch, so analysis never pulls it in.
    """
    from perl.trackers.store import RunStore, StoreError

    if lazy is None:
        # note: judged by the bytes on disk (compressed: ~half the values' size), before opening anything
        lazy = _disk_bytes(path) > LOAD_BYTES // 2
    # note: RunStore.open checks each file's header (schema, declared sizes, steps) before loading
    try:
        ds = RunStore.open(path, lazy=lazy, decode=decode)
    except FileNotFoundError as err:
        raise RunError(f"{path} disappeared while reading; call refresh() again.") from err
    except StoreError as err:
        raise RunError(str(err)) from None
    except Exception as err:  # noqa: BLE001 - netCDF4/HDF5 raise many types for a damaged file
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise RunError(
            f"Cannot read {path} as a netCDF store ({reason}); the file is damaged or not a tracker store."
        ) from None
    return ds


def _disk_bytes(path: Path) -> int:
    try:
        if Path(path).is_dir():
            return sum(f.stat().st_size for f in Path(path).glob("steps_*.nc"))
        return Path(path).stat().st_size
    except OSError:
        return 0


def read_metrics(path: Path) -> xr.Dataset:
    """``metrics.jsonl`` as a Dataset by ``step``: one float variable per numeric log key.

    A step logged twice (a resumed run, or the final summary) keeps the last value of each key. An
    unfinished last line (the file is being written) is ignored; any other bad line is an error.
    """
    from perl.schema import MAX_METRICS_BYTES, check_metrics_step

    try:
        if path.stat().st_size > MAX_METRICS_BYTES:
            raise RunError(
                f"{path} is larger than {MAX_METRICS_BYTES // 2**20} MiB, more than perl.train writes; "
                "expected the metrics.jsonl of a training run."
            )
        lines = path.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as err:
        raise RunError(
            f"Cannot read {path} ({type(err).__name__}); expected JSON lines written by perl.train."
        ) from None
    by_step: dict[int, dict[str, float]] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = check_metrics_step(record["step"])
        except (ValueError, KeyError, TypeError):
            if number == len(lines):  # an unfinished last line: the writer is mid-append
                continue
            raise RunError(
                f"{path} line {number} is not a JSON object with an integer 'step' in [0, 2**53]; "
                "expected one Trainer log per line as perl.train writes them."
            ) from None
        values = by_step.setdefault(int(step), {})
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                values[key] = float(value)
    steps = np.array(sorted(by_step), dtype=np.int64)
    keys = list(dict.fromkeys(k for s in steps for k in by_step[int(s)]))
    data = {}
    for key in keys:
        column = np.array([by_step[int(s)].get(key, math.nan) for s in steps], dtype=np.float64)
        data[metric_name(key)] = ("step", column, {"long_name": key, "units": _METRIC_UNITS.get(key, "1")})
    ds = xr.Dataset(data, coords={"step": ("step", steps, {"long_name": "optimizer step", "units": "steps"})})
    ds.attrs["source"] = str(path)
    return ds


def _read_config(path: Path) -> dict:
    from perl.config import ConfigError, config_from_dict, read_yaml_file

    if not path.is_file():
        return {}
    # note: the bounded reader of config files: size, alias expansion and nesting depth limited
    data = read_yaml_file(path, "the run's config", "replace it with the config.yaml perl.train wrote", error=RunError)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RunError(f"{path} holds a YAML {type(data).__name__}, expected a mapping of config sections.")
    try:
        config_from_dict(data, source=str(path))  # note: types and keys, as train() would read it
    except ConfigError as err:
        message = str(err) if str(path) in str(err) else f"{path}: {err}"
        raise RunError(message.rstrip(".") + "; expected the config.yaml written by perl.train.") from None
    return data


def _recover_overwrite(path: Path) -> None:
    """A training killed mid-overwrite left the previous run aside: put it back (see perl/rundir.py)."""
    from perl.config import ConfigError
    from perl.rundir import has_interrupted_overwrite, recover_interrupted_overwrite

    if not has_interrupted_overwrite(path):
        return
    try:
        restored = recover_interrupted_overwrite([path], lock_folder=path)
    except (OSError, ConfigError) as err:
        raise RunError(
            f"{path} holds a previous run that an interrupted overwrite moved aside into "
            f"{path}/.perl-previous-run and it could not be put back ({err}); move its contents "
            f"back into {path} by hand."
        ) from None
    for folder in restored:
        warnings.warn(
            f"Restored the previous run in {folder}: a training that overwrote it was killed before "
            "its first snapshot.",
            stacklevel=3,
        )


def _tracking_dir(path: Path, config: dict) -> Path:
    custom = _cfg(config, "tracker", "tracking_output_dir")
    if not custom:
        return path
    custom = Path(str(custom)).expanduser()
    for candidate in (
        [custom] if custom.is_absolute() else [Path.cwd() / custom, path / custom, path.parent / custom.name]
    ):
        if candidate.is_dir():
            return candidate
    return path


def _newer(live: Path, final: Path) -> Path | None:
    """The live store when it is newer than the final file (still training, or resumed)."""
    # note: the live store is a folder (its mtime moves at every append) or, in older runs, a file
    live_ok, final_ok = live.exists(), final.is_file()
    if live_ok and final_ok:
        return live if live.stat().st_mtime_ns > final.stat().st_mtime_ns else final
    return live if live_ok else final if final_ok else None


def _signature(path: Path | None) -> tuple:
    if path is None:
        return (None,)
    try:
        st = path.stat()
    except OSError:
        return (str(path), None)
    return (str(path), st.st_mtime_ns, st.st_size, st.st_ino)


def _cfg(config: dict, section: str, key: str):
    value = config.get(section) if isinstance(config, dict) else None
    return value.get(key) if isinstance(value, dict) else None


def _int_or_none(value):
    try:
        return int(value)
    except (TypeError, ValueError):
        return None

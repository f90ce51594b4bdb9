"""A run folder as one object: its config, spectra, gradients and training metrics.

`open_run` reads one run (finished, or still training: `.refresh()` re-reads what changed);
`open_runs` combines many along a ``run`` dimension, lazily, for sweeps. Everything here reads the
stored files only (docs/architecture.md, "Run folder"), so a run trained last week on a GPU
cluster opens the same way as one trained a minute ago in this kernel.

Files are read into memory and closed at once: the trackers replace their stores atomically after
every append, and a reader must not hold the file it is replaced under.
"""

from __future__ import annotations

import glob as _glob
import json
import math
import os
import warnings
from pathlib import Path
from typing import Iterable

import numpy as np
import xarray as xr

__all__ = ["Run", "Runs", "RunError", "MissingDataWarning", "open_run", "open_runs", "metric_name"]

SPECTRAL_LIVE = Path("spectral_logs") / "spectral_history.nc"
SPECTRAL_FINAL = Path("spectral_history_final.nc")
GRADIENT_LIVE = Path("gradient_logs") / "gradient_flow.nc"
GRADIENT_FINAL = Path("gradient_flow_final.nc")
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"

# units of the Trainer's logged values that are not dimensionless
_METRIC_UNITS = {"completions/mean_length": "tokens", "completions/min_length": "tokens",
                 "completions/max_length": "tokens", "completions/mean_terminated_length": "tokens",
                 "completions/min_terminated_length": "tokens", "completions/max_terminated_length": "tokens",
                 "num_tokens": "tokens", "train_runtime": "s", "epoch": "epochs"}


class RunError(ValueError):
    """A run folder or one of its files that cannot be read."""


class _NotARunFolder(RunError):
    """A folder without any file of a run (globs in `open_runs` skip these, never damaged runs)."""


class MissingDataWarning(UserWarning):
    """A run has no store of the kind asked for (e.g. gradient tracking was off)."""


def metric_name(key: str) -> str:
    """The variable name of a Trainer log key in `Run.metrics`: ``/`` (illegal in netCDF) becomes ``.``.

    Usage:
        >>> metric_name("rewards/format_reward/mean")
        'rewards.format_reward.mean'
    """
    return str(key).strip().replace("/", ".")


class Run:
    """One run folder: ``.config`` (dict), ``.spectral``, ``.gradients``, ``.metrics`` (xarray Datasets).

    Usage:
        run = perl.open_run("runs/demo")
        run.spectral.effective_rank.sel(module="q_proj").plot()    # layer x step
        run.metrics["reward"]                                       # by step
        run.refresh()                                               # a run still training

    Datasets are read on first access and kept until `refresh`. A store that does not exist reads
    as ``None`` with a `MissingDataWarning` saying why; a store that cannot be read raises
    `RunError`. Of a live store (``spectral_logs/spectral_history.nc``) and its final file
    (``spectral_history_final.nc``), the newer one is read.

    Args:
        path (str | Path): the run folder (``training.output_dir``).
    """

    def __init__(self, path: str | os.PathLike):
        path = Path(path).expanduser()
        if not path.is_dir():
            what = "is a file, not a folder" if path.exists() else "does not exist"
            raise RunError(f"Run folder {path} {what}; pass the output_dir of a training run.")
        self.path = path
        _recover_overwrite(path)
        self.config = _read_config(path / CONFIG_FILE)
        self.tracking_dir = _tracking_dir(path, self.config)
        self._cache: dict[str, tuple[tuple, xr.Dataset | None]] = {}
        if not self.config and not any(self._source(k) for k in ("spectral", "gradients", "metrics")):
            raise _NotARunFolder(
                f"{path} is not a run folder: no {CONFIG_FILE}, {METRICS_FILE} or tracking stores in it; "
                "pass the output_dir of a training run."
            )

    # ------------------------------------------------------------------ labels
    @property
    def name(self) -> str:
        """The folder name."""
        return self.path.name

    @property
    def method(self) -> str | None:
        """The PEFT type (``peft.type`` of the config, else the stores' ``peft_type`` attribute)."""
        return _cfg(self.config, "peft", "type") or self._attr("peft_type")

    @property
    def r(self) -> int | None:
        """The adapter rank."""
        value = _cfg(self.config, "peft", "r")
        return int(value) if value is not None else _int_or_none(self._attr("r"))

    @property
    def seed(self) -> int | None:
        """The run's seed (``common.seed``)."""
        value = _cfg(self.config, "common", "seed")
        return int(value) if value is not None else _int_or_none(self._attr("seed"))

    @property
    def label(self) -> str:
        """``"<method> r=<r> seed=<seed>"``, the run's label in comparisons."""
        parts = [str(self.method or "run")]
        if self.r is not None:
            parts.append(f"r={self.r}")
        if self.seed is not None:
            parts.append(f"seed={self.seed}")
        return " ".join(parts)

    # ------------------------------------------------------------------ data
    @property
    def spectral(self) -> xr.Dataset | None:
        """Spectral Dataset (step, layer, module, sv), or None if spectral tracking was off."""
        return self._get("spectral")

    @property
    def gradients(self) -> xr.Dataset | None:
        """Gradient Dataset (step, layer, module, component), or None if gradient tracking was off."""
        return self._get("gradients")

    @property
    def metrics(self) -> xr.Dataset | None:
        """Trainer logs by step (reward, losses, lengths, ...); names via `metric_name`."""
        return self._get("metrics")

    def refresh(self) -> "Run":
        """Re-read every file that changed on disk since it was read (a run still training)."""
        self.config = _read_config(self.path / CONFIG_FILE) or self.config
        for kind in list(self._cache):
            if self._cache[kind][0] != _signature(self._source(kind)):
                del self._cache[kind]
        return self

    def source(self, kind: str) -> Path | None:
        """The file that ``kind`` ("spectral", "gradients", "metrics") is read from, or None."""
        return self._source(kind)

    def __repr__(self) -> str:
        parts = []
        for kind in ("spectral", "gradients", "metrics"):
            src = self._source(kind)
            parts.append(f"{kind}={'-' if src is None else src.relative_to(self.path) if src.is_relative_to(self.path) else src}")
        return f"<Run {self.label} at {self.path}: {', '.join(parts)}>"

    # ------------------------------------------------------------------ internals
    def _source(self, kind: str) -> Path | None:
        if kind == "metrics":
            p = self.path / METRICS_FILE
            return p if p.is_file() else None
        live, final = (SPECTRAL_LIVE, SPECTRAL_FINAL) if kind == "spectral" else (GRADIENT_LIVE, GRADIENT_FINAL)
        for folder in dict.fromkeys([self.tracking_dir, self.path]):
            chosen = _newer(folder / live, folder / final)
            if chosen is not None:
                return chosen
        return None

    def _get(self, kind: str) -> xr.Dataset | None:
        if kind in self._cache:
            return self._cache[kind][1]
        src = self._source(kind)
        if src is None:
            hint = {
                "spectral": f"no {SPECTRAL_LIVE} or {SPECTRAL_FINAL}; train with --enable_spectral_tracking to record spectra",
                "gradients": f"no {GRADIENT_LIVE} or {GRADIENT_FINAL}; train with --enable_gradient_tracking to record gradients",
                "metrics": f"no {METRICS_FILE}; it is written by perl.train while training runs",
            }[kind]
            warnings.warn(f"Run {self.path} has no {kind} data ({hint}).", MissingDataWarning, stacklevel=3)
            return None
        signature = _signature(src)
        ds = read_metrics(src) if kind == "metrics" else read_store(src)
        self._cache[kind] = (signature, ds)
        return ds

    def _attr(self, name: str):
        for kind in ("spectral", "gradients"):
            if kind in self._cache and self._cache[kind][1] is not None:
                value = self._cache[kind][1].attrs.get(name)
                if value is not None:
                    return value
        return None


def open_run(output_dir: str | os.PathLike) -> Run:
    """Open a run folder (finished or still training) as a `Run`.

    Usage:
        >>> run = perl.open_run("runs/demo")
        >>> run.spectral.singular_values.sel(layer=0, module="q_proj", step=100)

    Args:
        output_dir (str | Path): the run folder (``training.output_dir``).
    """
    return Run(output_dir)


# ---------------------------------------------------------------------- reading files
def read_store(path: Path) -> xr.Dataset:
    """A tracker store (netCDF) loaded into memory, file closed; `RunError` if unreadable.

    Reads as `perl.trackers.store.RunStore.open` does (attrs ending in ``_json`` decoded), without
    importing the trackers package, so analysis never pulls in torch.
    """
    _check_store(path)
    try:
        with xr.open_dataset(path, engine="netcdf4", cache=False) as ds:
            loaded = ds.load()
    except FileNotFoundError as err:
        raise RunError(f"{path} disappeared while reading; call refresh() again.") from err
    except Exception as err:  # noqa: BLE001 - netCDF4/HDF5 raise many types for a damaged file
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise RunError(f"Cannot read {path} as a netCDF store ({reason}); the file is damaged or not a tracker store.") from None
    for name, value in list(loaded.attrs.items()):
        if isinstance(value, str) and name.endswith("_json"):
            try:
                loaded.attrs[name] = json.loads(value)
            except ValueError:
                pass
    return loaded


def _check_store(path: Path) -> None:
    from perl.schema import StoredFileError, check_store_file

    try:
        check_store_file(path)
    except StoredFileError as err:
        raise RunError(str(err)) from None


def read_metrics(path: Path) -> xr.Dataset:
    """``metrics.jsonl`` as a Dataset by ``step``: one float variable per numeric log key.

    A step logged twice (a resumed run, or the final summary) keeps the last value of each key. An
    unfinished last line (the file is being written) is ignored; any other bad line is an error.
    """
    from perl.schema import MAX_METRICS_BYTES, check_metrics_step

    try:
        if path.stat().st_size > MAX_METRICS_BYTES:
            raise RunError(f"{path} is larger than {MAX_METRICS_BYTES // 2**20} MiB, more than perl.train writes; "
                           "expected the metrics.jsonl of a training run.")
        lines = path.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as err:
        raise RunError(f"Cannot read {path} ({type(err).__name__}); expected JSON lines written by perl.train.") from None
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
        raise RunError(f"{path} holds a previous run that an interrupted overwrite moved aside into "
                       f"{path}/.perl-previous-run and it could not be put back ({err}); move its contents "
                       f"back into {path} by hand.") from None
    for folder in restored:
        warnings.warn(f"Restored the previous run in {folder}: a training that overwrote it was killed before "
                      "its first snapshot.", stacklevel=3)


def _tracking_dir(path: Path, config: dict) -> Path:
    custom = _cfg(config, "tracker", "tracking_output_dir")
    if not custom:
        return path
    custom = Path(str(custom)).expanduser()
    for candidate in ([custom] if custom.is_absolute() else [Path.cwd() / custom, path / custom, path.parent / custom.name]):
        if candidate.is_dir():
            return candidate
    return path


def _newer(live: Path, final: Path) -> Path | None:
    """The live store when it is newer than the final file (still training, or resumed)."""
    live_ok, final_ok = live.is_file(), final.is_file()
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


# ---------------------------------------------------------------------- many runs
class Runs:
    """Several runs combined along a ``run`` dimension (lazy, dask-backed).

    Usage:
        runs = perl.open_runs("sweeps/lora_vs_dora/*")
        runs.spectral.effective_rank.sel(module="q_proj").mean("layer")   # (run, step)
        runs.spectral.where(runs.spectral.method == "dora", drop=True)
        runs.metrics["reward"]                                            # (run, step)

    The ``run`` coordinate holds each run's label (``"<method> r=<r> seed=<seed>"``, made unique
    with the folder name when two runs share it); ``method``, ``r``, ``seed``, ``run_name`` and
    ``path`` are coordinates along ``run``. Runs with different layers, modules or steps are
    outer-joined: what a run does not have is NaN.

    Args:
        runs (list of Run): the runs, in order.
    """

    def __init__(self, runs: list[Run]):
        self.runs = list(runs)
        labels = [r.label for r in self.runs]
        self.labels = [
            f"{lab} ({r.name})" if labels.count(lab) > 1 else lab for lab, r in zip(labels, self.runs)
        ]
        self._cache: dict[str, xr.Dataset | None] = {}

    def __len__(self) -> int:
        return len(self.runs)

    def __iter__(self):
        return iter(self.runs)

    def __getitem__(self, i) -> Run:
        return self.runs[i]

    @property
    def spectral(self) -> xr.Dataset | None:
        """All spectral stores along ``run`` (dask arrays; ``.load()`` to read), or None."""
        return self._combined("spectral")

    @property
    def gradients(self) -> xr.Dataset | None:
        """All gradient stores along ``run`` (dask arrays), or None."""
        return self._combined("gradients")

    @property
    def metrics(self) -> xr.Dataset | None:
        """All training metrics along ``run`` (in memory: they are small), or None."""
        return self._combined("metrics")

    def refresh(self) -> "Runs":
        """Re-read every run (runs still training)."""
        for run in self.runs:
            run.refresh()
        self._cache.clear()
        return self

    def __repr__(self) -> str:
        return f"<Runs: {len(self)} runs: {', '.join(self.labels[:6])}{', ...' if len(self) > 6 else ''}>"

    def _combined(self, kind: str) -> xr.Dataset | None:
        if kind not in self._cache:
            self._cache[kind] = self._combine(kind)
        return self._cache[kind]

    def _combine(self, kind: str) -> xr.Dataset | None:
        parts, keep = [], []
        for i, run in enumerate(self.runs):
            if kind == "metrics":
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", MissingDataWarning)
                    ds = run.metrics
            else:
                src = run.source(kind)
                ds = None if src is None else _open_lazy(src)
            if ds is not None:
                parts.append(ds)
                keep.append(i)
        if not parts:
            warnings.warn(f"None of the {len(self.runs)} runs has {kind} data.", MissingDataWarning, stacklevel=3)
            return None
        return concat_runs(parts, [self.runs[i] for i in keep], [self.labels[i] for i in keep])


def concat_runs(parts: list[xr.Dataset], runs: list[Run], labels: list[str]) -> xr.Dataset:
    """Datasets of several runs (one each, same kind) along a ``run`` dimension, with the run coordinates.

    Dimensions are outer-joined in first-seen order (numbers sorted; xarray's own join would sort
    module names): what a run lacks is NaN. ``run`` holds ``labels``; ``method``, ``r``, ``seed``,
    ``run_name`` and ``path`` are coordinates along it; per-run attributes are dropped.
    """
    union = {}
    for ds in parts:
        for dim in ds.dims:
            if dim == "run" or dim not in ds.coords:
                continue
            seen = union.setdefault(dim, {})
            seen.update(dict.fromkeys(ds[dim].values.tolist()))
    for dim, seen in union.items():
        values = list(seen)
        if all(isinstance(v, (int, float, np.integer, np.floating)) for v in values):
            values = sorted(values)
        union[dim] = values
    parts = [ds.reindex({d: v for d, v in union.items() if d in ds.dims}) for ds in parts]
    combined = xr.concat(
        parts, dim="run", join="outer", data_vars="all", coords="minimal", compat="override",
        combine_attrs="drop_conflicts", fill_value=np.nan,
    )
    combined = combined.assign_coords(
        run=("run", list(labels)),
        method=("run", [str(r.method) for r in runs]),
        r=("run", [r.r if r.r is not None else -1 for r in runs]),
        seed=("run", [r.seed if r.seed is not None else -1 for r in runs]),
        run_name=("run", [r.name for r in runs]),
        path=("run", [str(r.path) for r in runs]),
    )
    for name in ("config_yaml", "peft_type", "r", "seed", "lora_alpha", "scaling", "source", "title"):
        combined.attrs.pop(name, None)
    return combined


def final_reward(metrics: xr.Dataset | None, last: int = 10, key: str = "reward") -> float:
    """Mean of the last ``last`` finite values of ``key`` logged in a run's metrics; NaN if none.

    Steps that logged no such value (the Trainer's final summary line, a step logged without
    rewards) do not count, so "the last 10" are always ten rewards when the run logged ten.

    Args:
        metrics (xr.Dataset | None): ``open_run(...).metrics`` (or ``read_metrics(path)``).
        last (int, default 10): how many logged values to average.
        key (str, default "reward"): the Trainer's log key (``rewards/equation_reward/mean``, ...).
    """
    name = metric_name(key)
    if metrics is None or name not in metrics:
        return float("nan")
    values = np.asarray(metrics[name].values, dtype=float)
    values = values[np.isfinite(values)]
    return float(values[-last:].mean()) if values.size else float("nan")


def _open_lazy(path: Path) -> xr.Dataset:
    _check_store(path)
    try:
        return xr.open_dataset(path, engine="netcdf4", chunks=-1, cache=False)  # one chunk per variable: few dask tasks
    except Exception as err:  # noqa: BLE001 - netCDF4/HDF5 raise many types for a damaged file
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise RunError(f"Cannot read {path} as a netCDF store ({reason}); the file is damaged or not a tracker store.") from None


def open_runs(runs: str | os.PathLike | Iterable) -> Runs:
    """Open several runs and combine them along a ``run`` dimension, lazily.

    Usage:
        >>> runs = perl.open_runs("runs/sweep/*")                 # a glob
        >>> runs = perl.open_runs(["runs/lora", "runs/dora"])     # or a list (paths or Runs)
        >>> runs.spectral.effective_rank.sel(module="v_proj").mean("layer").plot.line(x="step")

    Args:
        runs (str | Path | list): a glob pattern of run folders, one folder, or a list of
            folders / `Run` objects. Folders matched by a glob that are not runs are skipped.
    """
    if isinstance(runs, (str, os.PathLike)):
        pattern = os.path.expanduser(str(runs))
        if _glob.has_magic(pattern):
            matches = [Path(p) for p in sorted(_glob.glob(pattern)) if Path(p).is_dir()]
            opened = []
            for p in matches:
                try:
                    opened.append(Run(p))
                except _NotARunFolder:
                    continue  # note: a glob also matches folders that are not runs; a damaged run is an error
            if not opened:
                raise RunError(f"No run folders match {pattern!r}; pass a glob of training output_dirs.")
            return Runs(opened)
        runs = [runs]
    opened = [r if isinstance(r, Run) else Run(r) for r in runs]
    if not opened:
        raise RunError("open_runs got an empty list; pass run folders or a glob pattern.")
    return Runs(opened)

"""A run folder as one object: its config, spectra, gradients and training metrics.

`open_run` reads one run (finished, or still training: `.refresh()` re-reads what changed);
`open_runs` combines many along a ``run`` dimension, lazily, for sweeps. Everything here reads the
stored files only (docs/architecture.md, "Run folder"), so a run trained last week on a GPU
cluster opens the same way as one trained a minute ago in this kernel.

Stores are read through `perl.trackers.store.RunStore.open`: small ones into memory at once, large
ones (long runs) lazily, so opening a 10,000-snapshot run does not read it all.
"""

from __future__ import annotations

import glob as _glob
import os
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import xarray as xr

from perl.run_files import (
    RunError,
    _cfg,
    _int_or_none,
    _newer,
    _read_config,
    _recover_overwrite,
    _signature,
    _tracking_dir,
    metric_name,
    read_metrics,
    read_store,
)

__all__ = ["Run", "Runs", "RunError", "MissingDataWarning", "open_run", "open_runs", "metric_name"]

SPECTRAL_LIVE = Path("spectral_logs") / "spectral_history.nc"
SPECTRAL_FINAL = Path("spectral_history_final.nc")
GRADIENT_LIVE = Path("gradient_logs") / "gradient_flow.nc"
GRADIENT_FINAL = Path("gradient_flow_final.nc")
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"


class _NotARunFolder(RunError):
    """A folder without any file of a run (globs in `open_runs` skip these, never damaged runs)."""


class MissingDataWarning(UserWarning):
    """A run has no store of the kind asked for (e.g. gradient tracking was off)."""


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

    def refresh(self) -> Run:
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
            parts.append(
                f"{kind}={'-' if src is None else src.relative_to(self.path) if src.is_relative_to(self.path) else src}"
            )
        return f"<Run {self.label} at {self.path}: {', '.join(parts)}>"

    # ------------------------------------------------------------------ internals
    def _source(self, kind: str) -> Path | None:
        if kind == "metrics":
            p = self.path / METRICS_FILE
            return p if p.is_file() else None
        live, final = (SPECTRAL_LIVE, SPECTRAL_FINAL) if kind == "spectral" else (GRADIENT_LIVE, GRADIENT_FINAL)
        return self.store_path(live, final)

    def store_path(self, live: str | Path, final: str | Path) -> Path | None:
        """The newer of a tracker's live store ``live`` and final file ``final`` (names relative to the
        tracking folder, then the run folder), or None when the run has neither."""
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
        self.labels = [f"{lab} ({r.name})" if labels.count(lab) > 1 else lab for lab, r in zip(labels, self.runs)]
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

    def refresh(self) -> Runs:
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
                ds = None if src is None else src  # opened below: all at once when they share a layout
            if ds is not None:
                parts.append(ds)
                keep.append(i)
        if not parts:
            warnings.warn(f"None of the {len(self.runs)} runs has {kind} data.", MissingDataWarning, stacklevel=3)
            return None
        runs, labels = [self.runs[i] for i in keep], [self.labels[i] for i in keep]
        if kind == "metrics":
            return concat_runs(parts, runs, labels)
        from perl.trackers.store import RunStore, StoreError

        try:
            stacked = RunStore.open_stacked(parts)
        except StoreError as err:
            raise RunError(str(err)) from None
        if stacked is not None:
            return label_runs(xr.decode_cf(stacked), runs, labels)
        parts = [_open_lazy(src) for src in parts]
        if _same_layout(parts):
            return label_runs(xr.decode_cf(_stack_runs(parts)), runs, labels)
        return concat_runs([xr.decode_cf(ds) for ds in parts], runs, labels)


def concat_runs(parts: list[xr.Dataset], runs: list[Run], labels: list[str]) -> xr.Dataset:
    """Datasets of several runs (one each, same kind) along a ``run`` dimension, with the run coordinates.

    Dimensions are outer-joined in first-seen order (numbers sorted; xarray's own join would sort
    module names): what a run lacks is NaN. See :func:`label_runs` for the coordinates.
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
        parts,
        dim="run",
        join="outer",
        data_vars="all",
        coords="minimal",
        compat="override",
        combine_attrs="drop_conflicts",
        fill_value=np.nan,
    )
    return label_runs(combined, runs, labels)


def label_runs(combined: xr.Dataset, runs: list[Run], labels: list[str]) -> xr.Dataset:
    """``run`` holds ``labels``; ``method``, ``r``, ``seed``, ``run_name`` and ``path`` become
    coordinates along it; per-run attributes (config, seed, ...) are dropped."""
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


def logged_values(metrics: xr.Dataset | None, key: str) -> np.ndarray:
    """The finite values of a Trainer log key (``reward``, ``rewards/equation_reward/mean``, ...) in step
    order; empty when the run never logged it."""
    name = metric_name(key)
    if metrics is None or name not in metrics:
        return np.array([], dtype=float)
    values = np.asarray(metrics[name].values, dtype=float)
    return values[np.isfinite(values)]


def final_reward(metrics: xr.Dataset | None, last: int = 10, key: str = "reward") -> float:
    """Mean of the last ``last`` finite values of ``key`` logged in a run's metrics; NaN if none.

    Steps that logged no such value (the Trainer's final summary line, a step logged without
    rewards) do not count, so "the last 10" are always ten rewards when the run logged ten.

    Args:
        metrics (xr.Dataset | None): ``open_run(...).metrics`` (or ``read_metrics(path)``).
        last (int, default 10): how many logged values to average.
        key (str, default "reward"): the Trainer's log key (``rewards/equation_reward/mean``, ...).
    """
    values = logged_values(metrics, key)
    return float(values[-last:].mean()) if values.size else float("nan")


def _open_lazy(path: Path) -> xr.Dataset:
    # dask arrays, one chunk per variable and file: few dask tasks; CF-decoded once, after combining
    return read_store(path, lazy=True, decode=False)


def _same_layout(parts: list[xr.Dataset]) -> bool:
    """Stores of one sweep: the same variables, dtypes, dimensions and coordinate values (steps included)."""
    first = parts[0]
    for ds in parts[1:]:
        if ds.sizes != first.sizes or list(ds.variables) != list(first.variables):
            return False
        for name, var in ds.variables.items():
            ref = first.variables[name]
            if var.dims != ref.dims or var.dtype != ref.dtype:
                return False
            if name in ds.dims and not np.array_equal(var.values, ref.values):
                return False
    return True


def _stack_runs(parts: list[xr.Dataset]) -> xr.Dataset:
    """Stores of one layout stacked along ``run`` with one dask stack per variable: xr.concat took
    ten times longer over 100 runs (it aligns every variable of every run)."""
    import dask.array as dsa

    first = parts[0]
    data = {}
    for name, var in first.data_vars.items():
        arrays = [ds[name].data if hasattr(ds[name].data, "dask") else dsa.from_array(ds[name].values) for ds in parts]
        data[name] = (("run", *var.dims), dsa.stack(arrays), var.attrs)
    attrs = {k: v for k, v in first.attrs.items() if all(_equal(ds.attrs.get(k), v) for ds in parts[1:])}
    return xr.Dataset(data, coords=first.coords, attrs=attrs)


def _equal(a, b) -> bool:
    try:
        return (
            bool(np.array_equal(np.asarray(a, dtype=object), np.asarray(b, dtype=object)))
            if not isinstance(a, dict)
            else a == b
        )
    except Exception:  # noqa: BLE001 - attrs of any type: unequal when they cannot be compared
        return False


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

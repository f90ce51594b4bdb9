"""Append cost and bytes per snapshot of the run store over a long run, at Qwen2.5-1.5B spectral shapes.

Each snapshot is what ``SpectralTracker`` stores for a LoRA r=16 adapter on every linear layer of a
model with Qwen2.5-1.5B's shapes (28 blocks x 7 modules): ``singular_values`` (16), the update
spectrum (32), the 11 spectrum metrics of each (22 per-cell variables), ``scale`` and ``rank``. The
spectra drift slowly with the step and carry float noise (their low bits do not compress), and
are computed in float64 as the tracker does; the store keeps them as float32 (``float32=True``,
what the tracker asks for float32 weights).

Prints the median append time in a window around snapshot 10 and around the last snapshot (and
their ratio: target <= 2), the slowest append (the merges of BLOCK * MERGE snapshots), the total,
and the bytes per snapshot of the live store and of the final file against the store this
replaced (``--baseline N``: the previous ``perl/trackers/store.py`` from git, N appends; target
<= 40%).

    python benchmarks/store_append.py [--snapshots 10000] [--baseline 300] [--window 64] [--keep DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import xarray as xr

LAYERS, MODULES, R = 28, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), 16
BASELINE_COMMIT = "d7c3a0a"  # the last commit with the single-file, copy-on-append store


def snapshots(seed: int = 0):
    """An endless sequence of (step, Dataset) at 1.5B shapes, as the spectral tracker builds them."""
    import torch

    from perl.trackers import spectral_math as sm

    rng = np.random.default_rng(seed)
    cells = LAYERS * len(MODULES)
    base = np.sort(rng.gamma(2.0, 0.05, (cells, R)), axis=1)[:, ::-1]
    base_up = np.sort(rng.gamma(2.0, 0.05, (cells, 2 * R)), axis=1)[:, ::-1]
    coords = {
        "layer": np.arange(LAYERS),
        "module": np.array(MODULES, dtype=object),
        "sv": np.arange(R),
        "sv_update": np.arange(2 * R),
    }
    static = {
        "scale": (("layer", "module"), np.full((LAYERS, len(MODULES)), 2.0)),
        "rank": (("layer", "module"), np.full((LAYERS, len(MODULES)), float(R))),
    }
    step = 0
    while True:
        grow = 1.0 + 1e-4 * step
        sv = np.sort(base * grow * (1 + 1e-3 * rng.standard_normal(base.shape)), axis=1)[:, ::-1]
        up = np.sort(base_up * grow * (1 + 1e-3 * rng.standard_normal(base_up.shape)), axis=1)[:, ::-1]
        data = dict(static)
        data["singular_values"] = (("step", "layer", "module", "sv"), sv.reshape(1, LAYERS, len(MODULES), R))
        data["update_singular_values"] = (
            ("step", "layer", "module", "sv_update"),
            up.reshape(1, LAYERS, len(MODULES), 2 * R),
        )
        for prefix, values in (("", sv), ("update_", up)):
            for name, metric in sm.spectrum_metrics(torch.from_numpy(values.copy())).items():
                data[prefix + name] = (("step", "layer", "module"), metric.numpy().reshape(1, LAYERS, len(MODULES)))
        yield step, xr.Dataset(data, coords={"step": [step], **coords}, attrs={"peft_type": "lora", "r": R})
        step += 1


def folder_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_store(store_cls, path: Path, n: int, **kwargs) -> tuple[np.ndarray, object]:
    store = store_cls(path, attrs={"title": "benchmark"}, **kwargs)
    times = np.empty(n)
    gen = snapshots()
    for i in range(n):
        _, ds = next(gen)
        start = time.perf_counter()
        store.append(ds)
        times[i] = time.perf_counter() - start
    return times, store


def baseline_store_class(root: Path):
    """The previous RunStore (one file, copied at every append), imported from git."""
    repo = Path(__file__).resolve().parents[1]
    try:
        source = subprocess.run(
            ["git", "-C", str(repo), "show", f"{BASELINE_COMMIT}:perl/trackers/store.py"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    file = root / "baseline_store.py"
    file.write_text(source)
    spec = importlib.util.spec_from_file_location("baseline_store", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.RunStore


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--snapshots", type=int, default=10_000)
    parser.add_argument("--baseline", type=int, default=300, help="appends measured with the previous store (0: skip)")
    parser.add_argument(
        "--window",
        type=int,
        default=64,
        help="appends in each window whose median is compared (a multiple of BLOCK: whole cycles)",
    )
    parser.add_argument("--keep", type=Path, help="keep the store here (for benchmarks/open_runs.py --from)")
    args = parser.parse_args(argv)
    from perl.trackers.store import BLOCK, MERGE, RunStore

    root = Path(tempfile.mkdtemp(prefix="store_append_"))
    try:
        n, w = args.snapshots, min(args.window, args.snapshots // 2)
        path = (args.keep or root) / "spectral_logs" / "spectral_history.nc"
        if path.exists():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        start = time.perf_counter()
        times, store = run_store(RunStore, path, n, float32=True)
        total = time.perf_counter() - start
        live = folder_bytes(path)
        start = time.perf_counter()
        final = store.finalize(path.parent.parent / "spectral_history_final.nc")
        t_final = time.perf_counter() - start
        early = float(np.median(times[:w]))
        late = float(np.median(times[-w:]))
        slow = np.sort(times)[-3:][::-1]
        print(
            f"{n} snapshots at 1.5B shapes (28 x 7 modules, r=16, 24 per-cell variables), BLOCK={BLOCK}, MERGE={MERGE}"
        )
        print(
            f"append, median of snapshots 1-{w}: {1e3 * early:.1f} ms   of the last {w}: {1e3 * late:.1f} ms   "
            f"ratio last/early: {late / early:.2f} (target <= 2) "
            f"[{'ok' if late <= 2 * early else 'MISSED'}]"
        )
        print(
            f"append of snapshot 10: {1e3 * times[min(9, n - 1)]:.1f} ms, of snapshot {n}: {1e3 * times[-1]:.1f} ms; "
            f"p95 {1e3 * np.percentile(times, 95):.1f} ms; slowest {', '.join(f'{1e3 * t:.0f}' for t in slow)} ms "
            f"(merges of {BLOCK * MERGE} snapshots, every {BLOCK * MERGE} appends)"
        )
        print(f"total append time: {total:.1f} s ({1e3 * total / n:.1f} ms per snapshot); finalize: {t_final:.1f} s")
        print(f"files in the live store: {len(list(path.glob('steps_*.nc')))}")
        per_live, per_final = live / n, folder_bytes(final) / n
        print(f"bytes per snapshot: live store {per_live / 1e3:.1f} kB, final file {per_final / 1e3:.1f} kB")
        if args.baseline:
            old_cls = baseline_store_class(root)
            if old_cls is None:
                print(f"baseline: cannot read the previous store from git ({BASELINE_COMMIT}); skipped")
            else:
                nb = args.baseline
                old_times, _ = run_store(old_cls, root / "baseline" / "history.nc", nb)
                per_old = folder_bytes(root / "baseline" / "history.nc") / nb
                print(
                    f"previous store ({BASELINE_COMMIT}), {nb} appends: {per_old / 1e3:.1f} kB per snapshot; append "
                    f"median of snapshots 1-{w}: {1e3 * np.median(old_times[:w]):.1f} ms, of the last {w}: "
                    f"{1e3 * np.median(old_times[-w:]):.1f} ms"
                )
                print(
                    f"bytes per snapshot vs previous: live {100 * per_live / per_old:.0f}%, final "
                    f"{100 * per_final / per_old:.0f}% (target <= 40%) "
                    f"[{'ok' if per_live <= 0.4 * per_old else 'MISSED'}]"
                )
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

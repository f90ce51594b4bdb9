"""Opening long runs: `perl.open_run` on a 10,000-snapshot run and `perl.open_runs` over 100 of them.

The stores are written by the real `RunStore` (snapshots at Qwen2.5-1.5B spectral shapes from
``benchmarks/store_append.py``, appended 32 steps at a time so that writing 10,000 takes a minute;
the layout on disk is the same as when appended one at a time), then finalized. Measured:

- ``open_run(run).spectral`` on the finished run (the final file) and on the live store folder
  (the run still training), and loading one (layer, module) history: time, and bytes read from the
  files (``rchar`` of /proc/self/io) against the store's size;
- ``open_runs(glob).spectral`` over 100 finished runs (folders whose final file is a copy of the
  first run's, made with copy_file_range: a reflink where the filesystem has them, so little
  extra disk; a distinct file to the reader, never a hard link, which readers open once), lazily,
  and then one cell across all runs.

Targets (issue 11): open_run < 2 s and one history without reading the rest; open_runs of 100 < 5 s.
Files are in the page cache (just written): cold-cache times add the disk reads.

    python benchmarks/open_runs.py [--snapshots 10000] [--runs 100] [--from RUN_DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import xarray as xr

sys.path.insert(0, str(Path(__file__).resolve().parent))


def rchar() -> int:
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("rchar:"):
                return int(line.split()[1])
    except OSError:
        pass
    return -1


def write_run(run: Path, n: int, seed: int = 0) -> None:
    """A run folder with config.yaml, a live spectral store of n snapshots and its final file."""
    from store_append import snapshots

    from perl.trackers.store import BLOCK, RunStore

    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(f"peft:\n  type: lora\n  r: 16\ncommon:\n  seed: {seed}\n")
    store = RunStore(run / "spectral_logs" / "spectral_history.nc", float32=True)
    gen = snapshots(seed)
    done = 0
    while done < n:
        take = min(BLOCK, n - done)
        parts = [next(gen)[1] for _ in range(take)]
        store.append(xr.concat(parts, dim="step", data_vars="minimal", coords="minimal", compat="override"))
        done += take
    store.finalize(run / "spectral_history_final.nc")


def clone(src: Path, dst: Path) -> None:
    """A copy of ``src`` at ``dst``: a new inode (readers share one handle per inode: a hard link
    would be opened once for all runs), sharing extents where the filesystem can (reflink)."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        left = os.fstat(fin.fileno()).st_size
        try:
            while left > 0:
                done = os.copy_file_range(fin.fileno(), fout.fileno(), left)
                if done == 0:
                    break
                left -= done
        except OSError:
            fin.seek(0)
            fout.seek(0)
            fout.truncate()
            shutil.copyfileobj(fin, fout, 1 << 24)


def size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def time_open_run(run: Path, label: str, source_size: int) -> None:
    import perl

    start = time.perf_counter()
    r = perl.open_run(run)
    ds = r.spectral
    t_open = time.perf_counter() - start
    before = rchar()
    start = time.perf_counter()
    cell = ds.sel(layer=3, module="q_proj").load()
    t_cell = time.perf_counter() - start
    read = rchar() - before
    print(
        f"{label}: open_run + .spectral {t_open:.2f} s ({'lazy' if hasattr(ds.singular_values.data, 'dask') else 'loaded'}, "
        f"{ds.sizes['step']} steps, {len(ds.data_vars)} variables) [{'ok' if t_open < 2 else 'MISSED'} < 2 s]; "
        f"one (layer, module) history, every variable: {t_cell:.2f} s, {read / 1e6:.1f} MB read of "
        f"{source_size / 1e6:.0f} MB ({100 * read / max(source_size, 1):.1f}%)"
    )
    assert np.isfinite(cell.singular_values.values).all()
    ds.close()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--snapshots", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument(
        "--from", dest="source", type=Path, help="an existing run folder (e.g. store_append.py --keep)"
    )
    args = parser.parse_args(argv)
    import perl

    root = Path(tempfile.mkdtemp(prefix="open_runs_"))
    try:
        first = root / "run000"
        if args.source:
            shutil.copytree(args.source, first, copy_function=os.link)
            if not (first / "config.yaml").exists():
                (first / "config.yaml").write_text("peft:\n  type: lora\n  r: 16\ncommon:\n  seed: 0\n")
        else:
            start = time.perf_counter()
            write_run(first, args.snapshots)
            print(f"wrote a run of {args.snapshots} snapshots with RunStore in {time.perf_counter() - start:.0f} s")
        live, final = first / "spectral_logs" / "spectral_history.nc", first / "spectral_history_final.nc"
        print(
            f"live store: {len(list(live.glob('steps_*.nc')))} files, {size(live) / 1e6:.0f} MB; "
            f"final file {size(final) / 1e6:.0f} MB"
        )
        os.utime(final)  # the finished run: the final file is the newer one
        time_open_run(first, "finished run (final file)", size(final))
        only_live = root / "live_only"
        only_live.mkdir()
        shutil.copytree(live, only_live / "spectral_logs" / "spectral_history.nc", copy_function=os.link)
        shutil.copy(first / "config.yaml", only_live / "config.yaml")
        time_open_run(only_live, "run still training (live store folder)", size(live))

        for i in range(1, args.runs):
            run = root / f"run{i:03d}"
            run.mkdir()
            (run / "config.yaml").write_text(f"peft:\n  type: lora\n  r: 16\ncommon:\n  seed: {i}\n")
            clone(final, run / "spectral_history_final.nc")
        from perl import ncfiles

        ncfiles.close_all()  # note: every run's file is opened here, none was open before
        start = time.perf_counter()
        runs = perl.open_runs(str(root / "run*"))
        sp = runs.spectral
        t_open = time.perf_counter() - start
        start = time.perf_counter()
        cell = sp.effective_rank.sel(layer=3, module="q_proj").load()
        t_cell = time.perf_counter() - start
        print(
            f"open_runs over {len(runs)} finished runs + .spectral: {t_open:.2f} s, lazy "
            f"({'dask' if hasattr(sp.singular_values.data, 'dask') else 'in memory'}; dims {dict(sp.sizes)}) "
            f"[{'ok' if t_open < 5 else 'MISSED'} < 5 s]; effective_rank of one cell across runs: {t_cell:.2f} s"
        )
        assert cell.shape == (len(runs), sp.sizes["step"])
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

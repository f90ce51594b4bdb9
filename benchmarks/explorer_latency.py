"""Explorer latency: how long one slider move takes, against the 200 ms target.

Builds a synthetic run of 1000 steps x 28 layers x 7 modules x r=16 (the size of a long run on
DeepSeek-R1-Distill-Qwen-1.5B), opens `SpectralExplorer` and `GradientExplorer` on it, renders their
figures into a Bokeh document as a notebook would (with a comm that records what would be sent to
the browser), then times N programmatic slider moves through the full callback path: widget value
-> slice of the in-memory arrays -> ColumnDataSource update -> the JSON patch serialised and sent.

    python benchmarks/explorer_latency.py [--steps 1000 --layers 28 --modules 7 --r 16 --moves 60]

Prints the median and 95th percentile per move kind and their ratio to the target (< 1 is good).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

TARGET_MS = 200.0
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _attach(explorer):
    """Render the explorer's figures into a held Bokeh document with a recording comm."""
    from bokeh.document import Document
    from panel.io.model import add_to_doc
    from pyviz_comms import Comm

    class RecordingComm(Comm):
        """Stands in for the browser end of the notebook comm: counts the bytes pushed."""

        def __init__(self):
            super().__init__()
            self._comm = True  # "open": panel only pushes through an open comm
            self.sent = 0

        def init(self, on_msg=None):
            pass

        def send(self, data=None, metadata=None, buffers=()):
            self.sent += len(data or b"") + sum(len(b) for b in buffers)

    doc, comm = Document(), RecordingComm()
    root = explorer.pane.get_root(doc, comm)
    add_to_doc(root, doc, hold=True)
    return comm


def _time_moves(explorer, moves, rng, comm):
    """{control: ([ms, ...], [bytes pushed, ...])}: moves of each control, each to a value other than the current one."""
    times = {}
    for kind, values in moves.items():
        values, out, sent = list(values), [], []
        if len(values) < 2:
            continue
        widget = getattr(explorer, f"{kind}_w")
        for _ in range(_N):
            value = values[rng.integers(len(values))]
            while value == widget.value:
                value = values[rng.integers(len(values))]
            t0, b0 = time.perf_counter(), comm.sent
            explorer.select(**{kind: value})
            out.append((time.perf_counter() - t0) * 1e3)
            sent.append(comm.sent - b0)
        times[kind] = (out, sent)
    return times


def _report(name, times, comm):
    print(f"\n{name}: {comm.sent / 1e6:.1f} MB pushed in total")
    print(f"  {'control':<10} {'moves':>5} {'median ms':>10} {'p95 ms':>8} {'p95/target':>11} {'kB/move':>8}")
    worst = 0.0
    for kind, (ms, sent) in times.items():
        med, p95 = float(np.median(ms)), float(np.percentile(ms, 95))
        worst = max(worst, p95 / TARGET_MS)
        print(
            f"  {kind:<10} {len(ms):>5} {med:>10.1f} {p95:>8.1f} {p95 / TARGET_MS:>11.2f} {np.median(sent) / 1e3:>8.1f}"
        )
    return worst


_N = 60


def main(argv=None) -> int:
    global _N
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--modules", type=int, default=7)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--moves", type=int, default=60, help="moves timed per control")
    parser.add_argument("--run-dir", default=None, help="reuse/keep the synthetic run here")
    args = parser.parse_args(argv)
    _N = args.moves

    import perl
    from perl.synthetic import synthetic_run
    from perl.viz.explorers import GradientExplorer, SpectralExplorer

    tmp = None
    if args.run_dir is None:
        tmp = tempfile.TemporaryDirectory()
        run_dir = Path(tmp.name) / "run"
    else:
        run_dir = Path(args.run_dir)
    modules = MODULES[: min(args.modules, len(MODULES))]
    t0 = time.perf_counter()
    if not (run_dir / "spectral_history_final.nc").exists():
        synthetic_run(run_dir, steps=args.steps, layers=args.layers, modules=modules, r=args.r, seed=0, pngs=False)
    print(
        f"synthetic run {args.steps} steps x {args.layers} layers x {len(modules)} modules x r={args.r}: "
        f"written in {time.perf_counter() - t0:.1f} s"
    )

    t0 = time.perf_counter()
    run = perl.open_run(run_dir)
    spectral = SpectralExplorer(run)
    print(f"SpectralExplorer built (incl. reading the stores) in {time.perf_counter() - t0:.2f} s")
    rng = np.random.default_rng(0)
    comm = _attach(spectral)
    times = _time_moves(
        spectral,
        {
            "step": spectral.steps,
            "layer": spectral.layers,
            "module": spectral.modules,
            "metric": spectral.metric_names,
            "kind": spectral.kinds,
        },
        rng,
        comm,
    )
    worst = _report("SpectralExplorer", times, comm)

    t0 = time.perf_counter()
    gradient = GradientExplorer(run)
    print(f"\nGradientExplorer built in {time.perf_counter() - t0:.2f} s")
    comm = _attach(gradient)
    times = _time_moves(
        gradient,
        {
            "step": gradient.steps,
            "layer": gradient.layers,
            "module": gradient.modules,
            "component": gradient.components,
        },
        rng,
        comm,
    )
    worst = max(worst, _report("GradientExplorer", times, comm))
    print(f"\nworst p95 / {TARGET_MS:.0f} ms target = {worst:.2f} ({'meets' if worst < 1 else 'misses'} the target)")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Tracking overhead on the embedded model at frequency 1, inside a real GRPO run (the demo settings).

Two measurements, both printed as ratios:

1. In-run share: during one tracked run, the time spent inside the trackers' per-step calls
   (`SpectralTracker.log_step`, `GradientFlowTracker.log_step` + `log_update`) divided by the
   run's time per optimizer step. This isolates the trackers from sampling noise.
2. End to end: the same seeded run untracked and tracked; tracking consumes no random numbers, so
   both runs generate the same completions and the ratio of their runtimes is the overhead.

Targets (issues 4 and 5): spectral < 3 % and gradient < 2 % of step time.

Usage: python benchmarks/tracking_overhead.py [--steps 40]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from perl.config import TrainConfig
from perl.trackers.gradient import GradientFlowTracker
from perl.trackers.spectral import SpectralTracker
from perl.train import train

SPENT: dict[str, float] = defaultdict(float)


def _timed(cls, name: str, label: str) -> None:
    original = getattr(cls, name)

    def wrapper(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            SPENT[label] += time.perf_counter() - start

    setattr(cls, name, wrapper)


def _run(root: Path, label: str, steps: int, tracked: bool) -> float:
    cfg = TrainConfig()
    cfg.training.output_dir = str(root / label)
    cfg.training.max_steps = steps
    cfg.tracker.enable_spectral_tracking = tracked
    cfg.tracker.enable_gradient_tracking = tracked
    cfg.tracker.spectral_log_frequency = 1
    cfg.tracker.gradient_log_frequency = 1
    result = train(cfg)
    runtime = next(h["train_runtime"] for h in reversed(result.log_history) if "train_runtime" in h)
    return runtime / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    options = parser.parse_args()
    _timed(SpectralTracker, "log_step", "spectral")
    _timed(GradientFlowTracker, "log_step", "gradient")
    _timed(GradientFlowTracker, "log_update", "gradient")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        untracked = _run(root, "untracked", options.steps, tracked=False)
        SPENT.clear()
        tracked = _run(root, "tracked", options.steps, tracked=True)
    spectral = SPENT["spectral"] / options.steps
    gradient = SPENT["gradient"] / options.steps
    print(f"embedded model, demo settings, {options.steps} steps, frequency 1")
    print(f"  step time: {untracked:.3f} s untracked, {tracked:.3f} s tracked")
    print(
        f"  in-run share: spectral {spectral * 1e3:.1f} ms/step = {100 * spectral / tracked:.2f}% (target < 3%), "
        f"gradient {gradient * 1e3:.1f} ms/step = {100 * gradient / tracked:.2f}% (target < 2%)"
    )
    print(f"  end to end: tracked / untracked = {tracked / untracked:.3f}")


if __name__ == "__main__":
    main()

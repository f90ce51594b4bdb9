"""Check that tracking works on this machine, without a GPU: environment, config defaults, a tiny run.

Prints a pass/fail table and exits non-zero when a check fails.

Usage: python scripts/validate_tracking_setup.py
"""

from __future__ import annotations

import importlib
import sys
import tempfile
import traceback
from pathlib import Path

# the nine tracker options and defaults of the PeRL tracking docs
DOC_DEFAULTS = {
    "enable_spectral_tracking": False,
    "enable_gradient_tracking": False,
    "spectral_log_frequency": 100,
    "gradient_log_frequency": 100,
    "track_adapter_only": True,
    "compute_full_svd": True,
    "max_layers_to_track": None,
    "save_with_checkpoints": True,
    "tracking_output_dir": None,
}


def check_imports() -> str:
    versions = []
    for name in ("torch", "transformers", "peft", "trl", "accelerate", "xarray", "netCDF4"):
        module = importlib.import_module(name)
        versions.append(f"{name} {getattr(module, '__version__', '?')}")
    return ", ".join(versions)


def check_config_defaults() -> str:
    from perl.config import TrackerConfig

    cfg = TrackerConfig()
    wrong = {k: getattr(cfg, k) for k, v in DOC_DEFAULTS.items() if getattr(cfg, k) != v}
    if wrong:
        raise AssertionError(f"defaults differ from the tracking docs: {wrong}")
    return "nine tracker options with the documented defaults"


def check_tiny_run() -> str:
    from perl.testing import distinct_characters_reward, tiny_train_config
    from perl.trackers import GradientFlowTracker, SpectralTracker
    from perl.train import train

    with tempfile.TemporaryDirectory() as tmp:
        result = train(tiny_train_config(Path(tmp) / "run", max_steps=2), reward_funcs=[distinct_characters_reward])
        spectral = SpectralTracker.load(result.output_dir / "spectral_history_final.nc").data
        gradients = GradientFlowTracker.load(result.output_dir / "gradient_flow_final.nc").data
        return (
            f"spectral steps {list(map(int, spectral.step.values))}, "
            f"gradient steps {list(map(int, gradients.step.values))}"
        )


CHECKS = [
    ("imports", check_imports),
    ("config defaults", check_config_defaults),
    ("tiny tracked training", check_tiny_run),
]


def main() -> int:
    rows, failed = [], 0
    for name, check in CHECKS:
        try:
            rows.append((name, "PASS", check()))
        except Exception as exc:  # noqa: BLE001 - a validation script reports every failure
            failed += 1
            rows.append((name, "FAIL", f"{type(exc).__name__}: {exc}"))
            traceback.print_exc()
    width = max(len(r[0]) for r in rows)
    print()
    for name, status, detail in rows:
        print(f"{name:<{width}}  {status}  {detail}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

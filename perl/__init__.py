"""PeRL workbench: how parameter-efficient adapters learn under GRPO.

The heavy parts (torch, transformers) load only when used, so ``import perl`` is instant and
``perl.open_run`` works in an analysis notebook without touching a model.
"""

import os as _os

# note: idle OpenMP threads otherwise spin and, on a busy 2-core machine, slow torch tenfold
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

_LAZY = {
    "open_run": ("perl.run", "open_run"),
    "open_runs": ("perl.run", "open_runs"),
    "train": ("perl.train", "train"),
    "TrainConfig": ("perl.config", "TrainConfig"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'perl' has no attribute {name!r}")


__all__ = ["__version__", *_LAZY]

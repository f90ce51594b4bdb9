"""Trackers: spectra and gradient flow of PEFT adapters, recorded as netCDF run stores.

Names load lazily, so ``from perl.trackers.store import RunStore`` (analysis, viz) does not import
torch or transformers.
"""

from importlib import import_module

_LAZY = {
    "RunStore": (".store", "RunStore"),
    "StoreError": (".store", "StoreError"),
    "SpectralTracker": (".spectral", "SpectralTracker"),
    "SpectralTrackingCallback": (".callbacks", "SpectralTrackingCallback"),
    "discover_adapters": (".discovery", "discover_adapters"),
    "discover_full_weights": (".discovery", "discover_full_weights"),
    "GradientFlowTracker": (".gradient", "GradientFlowTracker"),
    "GradientFlowCallback": (".callbacks", "GradientFlowCallback"),
    "AlignmentTracker": (".alignment", "AlignmentTracker"),
    "AlignmentTrackingCallback": (".alignment", "AlignmentTrackingCallback"),
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'perl.trackers' has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = getattr(import_module(module, __name__), attr)
    globals()[name] = value
    return value

"""What the read APIs of stored runs share (`SpectralHistory`, `GradientFlowHistory`): finding the
store that ``load()`` opens, and ``data``.

Usage:
    path = history_path(run_dir, [FINAL_NAME, f"{SPECTRAL_DIR}/{STORE_NAME}"], "No spectral history in {path}")
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import xarray as xr

from .pt_names import resolve_pt_name
from .store import RunStore

__all__ = ["StoredHistory", "history_path"]


def history_path(path: str | os.PathLike, candidates: Sequence[str], missing: str) -> Path:
    """The store ``load()`` opens: ``path`` itself (a file or a store folder; a TRACKING.md ``.pt`` name
    becomes the ``.nc`` beside it), or in a run folder the first of ``candidates`` that exists.

    Raises:
        FileNotFoundError: ``missing`` (``{path}`` replaced by the folder) when a run folder holds none.
    """
    path = resolve_pt_name(path)
    if path.is_dir() and not RunStore.is_store(path):
        found = next((path / c for c in candidates if (path / c).exists()), None)
        if found is None:
            raise FileNotFoundError(missing.replace("{path}", str(path)))
        path = found
    return path


class StoredHistory:
    """A read API's ``data``: the Dataset ``load()`` read (``_loaded``), else the live tracker's ``store``."""

    _loaded: xr.Dataset | None = None

    @property
    def data(self) -> xr.Dataset:
        """The recorded Dataset (the stored steps; a pending, unwritten step is not included)."""
        if self._loaded is not None:
            return self._loaded
        return self.store.read()

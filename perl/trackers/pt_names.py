"""The file names of the original PeRL tracking docs (TRACKING.md) on this workbench's stores.

The original saves ``spectral_history_final.pt``, ``gradient_flow_final.pt`` and
``spectral_logs/spectral_history.pt`` / ``gradient_logs/gradient_flow.pt`` (PyTorch pickles);
this workbench writes the same data as netCDF under the same name with ``.nc``. ``.load()`` of a
``.pt`` name opens the ``.nc`` beside it and says so in one line; a ``.pt`` file itself is never
unpickled (a pickle runs code of whoever wrote it).

Usage:
    path = resolve_pt_name(Path("runs/demo/spectral_history_final.pt"))   # -> .../spectral_history_final.nc
"""

from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["resolve_pt_name"]


def resolve_pt_name(path: str | Path) -> Path:
    """``path`` itself, or for a ``.pt`` name the ``.nc`` store beside it (with a one-line note on stderr).

    Raises:
        FileNotFoundError: a ``.pt`` name with no ``.nc`` store beside it.
        ValueError: a ``.pt`` file (a pickle, e.g. from the original PeRL) with no ``.nc`` beside it.
    """
    path = Path(path)
    if path.suffix != ".pt":
        return path
    store = path.with_suffix(".nc")
    if store.exists():  # a final .nc file or a live store folder
        print(
            f"note: {path.name} is {store} in this workbench (netCDF, read with xarray; nothing is unpickled).",
            file=sys.stderr,
        )
        return store
    if path.is_file():
        raise ValueError(
            f"{path} is a PyTorch pickle (the original PeRL's format), which this workbench never "
            f"unpickles; open a run of this workbench (its folder or its {store.name}) instead."
        )
    raise FileNotFoundError(
        f"{path} does not exist, nor {store.name} beside it, where this workbench stores what "
        f"the PeRL tracking docs call {path.name}; pass the run folder or its .nc store."
    )

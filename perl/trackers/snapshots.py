"""What the spectral and alignment trackers share: logging one snapshot, resuming, the initial-state file.

Both trackers keep the initial state of each module (``tracker._init``: module name -> part name ->
tensor, e.g. ``B0`` / ``A0``) for the update since init, and both append one Dataset per logged
step to a :class:`~perl.trackers.store.RunStore`, with the same rule for which rank computes and
writes (:func:`perl.trackers.sharding.writes_snapshot`).

The initial state goes into one file per checkpoint, ``tracker_init.safetensors`` (keys
``"<module>::<part>"``, no pickle): each tracker adds its parts, a part another tracker wrote with
the same values (the B_0, A_0 both keep) is stored once, and the metadata lists under each
tracker's name the keys it reads back. Checkpoints of earlier versions, with one file per tracker
(``spectral_tracker_init.safetensors``, ``alignment_tracker_init.safetensors``), are still read.

Usage:
    >>> save_init_tensors(tracker._init, checkpoint, "spectral")
    >>> restored = load_init_tensors(checkpoint, "spectral", expected={name: {"B0": (m, r), "A0": (r, n)}, ...})
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
import xarray as xr

from . import sharding

logger = logging.getLogger("perl")

__all__ = ["save_init_tensors", "load_init_tensors", "log_snapshot", "StoreLifecycle", "INIT_STATE_NAME"]


INIT_STATE_NAME = "tracker_init.safetensors"
# the one file per tracker that checkpoints of earlier versions hold
LEGACY_INIT_NAMES = {
    "spectral": "spectral_tracker_init.safetensors",
    "alignment": "alignment_tracker_init.safetensors",
}


def save_init_tensors(init: dict[str, dict[str, torch.Tensor]], directory: Path, owner: str, **metadata: str) -> Path:
    """Add ``init`` (module -> part -> tensor) to ``directory``'s initial-state file, written atomically.

    A part already in the file with equal values is kept once; with other values (not expected: both
    trackers copy the same parameters) this owner's is kept apart, under ``"<owner>/<module>::<part>"``.
    """
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    path = Path(directory) / INIT_STATE_NAME
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, str] = {"format": "perl-tracker-init-1"}
    if path.is_file():
        with safe_open(str(path), framework="pt") as f:
            meta.update(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 - not a mapping
    keys = []
    for name, parts in init.items():
        for part, tensor in parts.items():
            key, tensor = f"{name}::{part}", tensor.detach().contiguous().cpu()
            held = tensors.get(key)
            if held is not None and not (held.dtype == tensor.dtype and torch.equal(held, tensor)):
                key = f"{owner}/{key}"
            tensors[key] = tensor
            keys.append(key)
    meta[owner] = json.dumps({"modules": sorted(init), "keys": sorted(keys), **metadata}, sort_keys=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_init_tensors(
    directory: Path, owner: str, expected: dict[str, dict[str, tuple]]
) -> dict[str, dict[str, torch.Tensor]] | None:
    """``owner``'s initial state saved by :func:`save_init_tensors` (CPU tensors); None if it saved none there.

    Args:
        directory (`Path`): the checkpoint folder.
        owner (`str`): the tracker (``"spectral"``, ``"alignment"``).
        expected (`dict`): module name -> part name -> shape, of the model being resumed. A file
            naming another module or holding a part of another shape is refused with one clear error.
    """
    import json

    from safetensors import safe_open

    path = Path(directory) / INIT_STATE_NAME
    if not path.is_file():
        legacy = Path(directory) / LEGACY_INIT_NAMES.get(owner, "")
        return _read_init(legacy, None, None, expected) if legacy.is_file() else None
    with safe_open(str(path), framework="pt") as f:
        entry = (f.metadata() or {}).get(owner)
    if entry is None:
        return None
    try:
        listed = json.loads(entry)
        modules, keys = list(listed["modules"]), list(listed["keys"])
    except (ValueError, KeyError, TypeError):
        raise ValueError(
            f"{path}: the entry of the {owner} tracker is not what perl writes; resume from another checkpoint."
        ) from None
    return _read_init(path, modules, keys, expected)


def _read_init(
    path: Path, modules: list | None, keys: list | None, expected: dict
) -> dict[str, dict[str, torch.Tensor]]:
    """The tensors of ``keys`` (all keys when None) by module and part, checked against ``expected``."""
    from safetensors import safe_open

    restored: dict[str, dict[str, torch.Tensor]] = {name: {} for name in expected}
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys()) if keys is None else keys
        present = set(f.keys())
        for name in modules or []:
            _known(path, name, restored)
        for key in keys:
            if key not in present:
                raise ValueError(f"{path} lacks {key!r}; resume from another checkpoint.")
            name, _, part = key.split("/", 1)[-1].rpartition("::")
            _known(path, name, restored)
            restored[name][part] = f.get_tensor(key)
    for name, parts in restored.items():
        for part, tensor in parts.items():
            shape = expected[name].get(part)
            if shape is not None and tuple(tensor.shape) != tuple(shape):
                raise ValueError(
                    f"{path}: initial {part} of {name!r} has shape {tuple(tensor.shape)}, the model "
                    f"has {tuple(shape)}; resume with the adapter config of the original run."
                )
    return restored


def _known(path: Path, name: str, restored: dict) -> None:
    if name not in restored:
        raise ValueError(
            f"{path} holds initial factors for {name!r}, which this model does not have; "
            "resume with the model and adapter config of the original run."
        )


class StoreLifecycle:
    """Mixin of the spectral and alignment trackers: ``resume`` and ``start_fresh`` of their store.

    A subclass has ``store``, ``is_world_process_zero`` and ``load_init_state``, and sets
    ``_store_kind`` (word in the log), ``_init_state_name`` (the file in a checkpoint) and
    ``_without_init`` (what a resume without that file measures from).
    """

    _store_kind: str
    _init_state_name: str
    _without_init: str

    def resume(self, step: int, checkpoint_dir: str | os.PathLike | None = None) -> None:
        """Continue after resuming from checkpoint-``step``: restore the initial state, drop stored steps > step."""
        if checkpoint_dir is not None and not self.load_init_state(checkpoint_dir):
            logger.warning("No %s in %s: %s", self._init_state_name, checkpoint_dir, self._without_init)
        if self.is_world_process_zero:
            self.store.truncate_after(int(step))

    def start_fresh(self) -> None:
        """Remove a store left by an earlier run in the same folder (a new run starting at step 0)."""
        if self.is_world_process_zero and self.store.steps:
            logger.warning(
                "Replacing the %s store %s of an earlier run (%d steps).",
                self._store_kind,
                self.store.path,
                len(self.store.steps),
            )
            self.store.clear()


def log_snapshot(tracker, step: int, compute: Callable[[int], xr.Dataset]) -> xr.Dataset | None:
    """A tracker's ``log_step``: ``compute(step)`` appended to its store, on the rank that writes.

    Returns the snapshot (None when tracking is off, on processes that do not write, or if ``step``
    is already stored). Non-writing ranks of a sharded model take part in the gathers through
    ``tracker._take_part``.
    """
    if not tracker.enabled:
        return None
    step = int(step)
    if not sharding.writes_snapshot(
        tracker.is_world_process_zero, lambda: step in tracker.store.steps, tracker._params, tracker._take_part
    ):
        return None
    snapshot = compute(step)
    tracker.store.append(snapshot)
    tracker.last_scalars = tracker._scalars(snapshot)
    return snapshot

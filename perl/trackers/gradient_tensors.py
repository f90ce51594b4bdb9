"""What the gradient flow tracker tracks: every trainable tensor as a (layer, module, component) cell."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from .discovery import (
    DiscoveryError,
    _clean_name,
    _layer_and_rest,
    discover_adapters,
    discover_full_weights,
    peft_config_of,
)


# ------------------------------------------------------------------------------------ what is tracked
@dataclass(frozen=True)
class TrackedTensor:
    """One tracked tensor and its cell. Several tensors may share a cell (LayerNorm weight + bias)."""

    layer: int
    module: str
    component: str
    name: str
    param: torch.Tensor


_PEFT_WRAPPER_PARTS = re.compile(r"\.(?:base_layer|modules_to_save\.[^.]+)(?=\.)")


def _extra_coordinates(name: str) -> tuple[int, str, str, str]:
    """``(layer, module path inside the block, component, module path)`` of a plain (non-adapter)
    parameter name, by the naming rules adapters get in discovery."""
    # peft keeps a trained base bias / a modules_to_save copy under a wrapper: name it after the module
    path, _, component = _PEFT_WRAPPER_PARTS.sub("", _clean_name(name)).rpartition(".")
    layer, rest = _layer_and_rest(path)
    return layer, rest, component, path


def tracked_tensors(model: nn.Module, track_adapter_only: bool = True, target_modules=None) -> list[TrackedTensor]:
    """The tensors a :class:`GradientFlowTracker` records, with their (layer, module, component).

    Adapter tensors come from :func:`perl.trackers.discovery.discover_adapters` (active adapter
    only). With ``track_adapter_only=False`` every other trainable parameter is added: component
    ``weight`` / ``bias`` (or the parameter's own name), module the last name component inside
    its block (the path inside the block when that is ambiguous), layer -1 outside the blocks.
    A model without peft adapter (full fine-tuning) with ``track_adapter_only=True`` gives the
    weights of the ``target_modules`` (component ``weight``).

    Args:
        model (nn.Module): a peft model, or any model for full fine-tuning.
        track_adapter_only (bool, defaults to True): only the adapter's tensors (full fine-tuning:
            only the target modules' weights).
        target_modules (list[str], optional): full fine-tuning: the modules to track; default every
            ``nn.Linear`` except the output head.

    Raises:
        DiscoveryError: a model without trainable target weights.
    """
    try:
        if not peft_config_of(model):
            # note: full fine-tuning: the weights of the modules an adapter would adapt
            adapters = [
                w for w in discover_full_weights(model, target_modules) if w.components["weight"][0].requires_grad
            ]
            if not adapters:
                raise DiscoveryError(f"No trainable weight among the target modules {target_modules}.")
        else:
            adapters = discover_adapters(model)
    except DiscoveryError as err:
        if track_adapter_only:
            raise DiscoveryError(f"{err} Pass track_adapter_only=False to track all trainable weights.") from err
        adapters = []
    out: list[TrackedTensor] = []
    seen: set[int] = set()
    for am in adapters:
        for component, tensors in am.components.items():
            for i, p in enumerate(tensors):
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(TrackedTensor(am.layer, am.module, component, f"{am.name}.{component}[{i}]", p))
    if track_adapter_only:
        return out

    extras = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in seen]
    coords = [_extra_coordinates(n) for n, _ in extras]
    # short module names unless two different modules of one layer share the last name component
    modules_by_short: dict[tuple[int, str], set[str]] = {}
    for am in adapters:
        modules_by_short.setdefault((am.layer, am.module), set()).add(am.name)
    for layer, rest, _, path in coords:
        modules_by_short.setdefault((layer, rest.rpartition(".")[2]), set()).add(path)
    for (n, p), (layer, rest, component, path) in zip(extras, coords):
        short = rest.rpartition(".")[2]
        if len(modules_by_short[(layer, short)]) > 1:
            short = rest if layer >= 0 else path
        out.append(TrackedTensor(layer, short, component, n, p))
    return out


def _ordered(values, order=()) -> list:
    first = [v for v in order if v in values]
    return first + [v for v in dict.fromkeys(values) if v not in first]

"""SliceFine: train a slice of ``r`` columns (or rows) of each target weight, everything else frozen.

The method of the original PeRL's ``perl/lora/slicefine.py`` (written anew here): for a target
``nn.Linear`` with weight ``W0`` (out x in), the columns ``[p, p + r)`` (``slice_mode="column"``) or the
rows ``[p, p + r)`` (``slice_mode="row"``) become one trainable tensor ``T`` initialised with a copy
of that slice; the effective weight is ``W0`` with the slice replaced by ``T``. The weight change
``delta_W = W_eff - W0`` is therefore zero outside the slice and ``T - W0[slice]`` inside it: rank
<= r, with the factored form

- column: ``delta_W = (T - W0[:, p:p+r]) @ E`` with ``E`` (r x in) the rows ``p..p+r-1`` of the identity;
- row:    ``delta_W = E^T @ (T - W0[p:p+r, :])`` with ``E^T`` (out x r) the columns ``p..p+r-1`` of the identity,

which :mod:`perl.trackers.discovery` hands to the spectral tracker (singular values of the slice
change, no m x n SVD).

It is a peft tuner (``SliceFineConfig`` / ``SliceFineModel`` / ``SliceFineLinear``), so
``get_peft_model``, ``save_pretrained`` (only the slices go into ``adapter_model.safetensors``),
``PeftModel.from_pretrained`` and TRL's adapter handling work as for peft's own methods. peft's
public ``register_peft_method`` accepts only names of its ``PeftType`` enum, so :func:`register`
puts the method into the same three lookup tables that function fills, under ``"SLICEFINE"``;
importing this module does it.

Usage:
```python
from peft import get_peft_model
from perl.adapters.slicefine import SliceFineConfig

model = get_peft_model(model, SliceFineConfig(r=8, target_modules=["q_proj", "v_proj"]))
```
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from peft.config import PeftConfig
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_adapters_to_merge
from peft.utils.integrations import gather_params_ctx
from torch import nn

__all__ = [
    "SLICEFINE",
    "SLICE_MODES",
    "SliceFineConfig",
    "SliceFineLayer",
    "SliceFineLinear",
    "SliceFineModel",
    "register",
]

SLICEFINE = "SLICEFINE"
SLICE_MODES = ("column", "row")


@dataclass
class SliceFineConfig(PeftConfig):
    """Configuration of a :class:`SliceFineModel`.

    Args:
        r (`int`, defaults to 8): width of the trainable slice (columns or rows); clipped to the weight's size.
        slice_mode (`str`, defaults to "column"): ``"column"`` (r input features) or ``"row"`` (r output features).
        slice_position (`int`, defaults to 0): first column / row of the slice; moved left so that the slice
            fits (``min(p, n - r)``), as the original does.
        target_modules (`list[str] | str`, *optional*): module names (peft's matching rules).
    """

    r: int = field(default=8, metadata={"help": "Width of the trainable slice (columns or rows)."})
    slice_mode: str = field(default="column", metadata={"help": "'column' or 'row'."})
    slice_position: int = field(default=0, metadata={"help": "First column / row of the slice."})
    target_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to adapt."})
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to skip."})
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None)
    layers_pattern: Optional[Union[list[str], str]] = field(default=None)
    modules_to_save: Optional[list[str]] = field(default=None)

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = SLICEFINE
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if self.slice_mode not in SLICE_MODES:
            raise ValueError(f"SliceFine slice_mode must be one of {SLICE_MODES}, got {self.slice_mode!r}")
        if int(self.r) < 1 or int(self.slice_position) < 0:
            raise ValueError(
                f"SliceFine needs r >= 1 and slice_position >= 0, got r={self.r}, slice_position={self.slice_position}"
            )


class SliceFineLayer(BaseTunerLayer):
    """The peft layer mix-in: per adapter one trainable slice ``slicefine_slice[adapter]``."""

    adapter_layer_names = ("slicefine_slice",)
    other_param_names = ("slicefine_base", "slicefine_r", "slicefine_mode", "slicefine_start")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.slicefine_slice = nn.ParameterDict({})
        # note: W0[slice], frozen, not saved (rebuilt from the base weight): the forward and the trackers read
        # the slice here, never the base weight, which ZeRO-3 partitions and FSDP2 shards outside its forward
        self.slicefine_base = BufferDict({}, persistent=False)
        self.slicefine_r: dict[str, int] = {}
        self.slicefine_mode: dict[str, str] = {}
        self.slicefine_start: dict[str, int] = {}
        self._slicefine_unmerged: dict[str, torch.Tensor] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self.kwargs = kwargs
        base = self.get_base_layer()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"SliceFine adapts nn.Linear layers only, got {type(base).__name__}")
        self.in_features, self.out_features = base.in_features, base.out_features

    def update_layer(
        self, adapter_name: str, r: int, slice_mode: str, slice_position: int, inference_mode: bool = False, **kwargs
    ) -> None:
        total = self.in_features if slice_mode == "column" else self.out_features
        width = min(int(r), total)
        start = min(int(slice_position), total - width)
        self.slicefine_r[adapter_name] = width
        self.slicefine_mode[adapter_name] = slice_mode
        self.slicefine_start[adapter_name] = start
        weight = self.get_base_layer().weight
        with gather_params_ctx(weight, modifier_rank=None):  # note: ZeRO-3 partitions the base weight
            piece = weight[:, start : start + width] if slice_mode == "column" else weight[start : start + width, :]
            piece = piece.detach().clone()
        self.slicefine_base[adapter_name] = piece
        self.slicefine_slice[adapter_name] = nn.Parameter(piece.clone())
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def base_slice(self, adapter_name: str) -> torch.Tensor:
        """The frozen base weight's values at the slice (``W0[:, p:p+r]`` or ``W0[p:p+r, :]``)."""
        if adapter_name in self._slicefine_unmerged:
            return self._slicefine_unmerged[adapter_name]
        return self.slicefine_base[adapter_name]

    def slice_change(self, adapter_name: str, read=None) -> torch.Tensor:
        """``T - W0[slice]``: the trained change of the slice (zero at initialisation).

        ``read`` maps the trainable slice to the tensor to read (the trackers' gathered copy when sharded).
        """
        trained = self.slicefine_slice[adapter_name] if read is None else read(self.slicefine_slice[adapter_name])
        return trained - self.base_slice(adapter_name).to(trained)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The dense weight change (out x in), zero outside the slice. Costs O(out * in) memory."""
        change = self.slice_change(adapter_name)
        delta = torch.zeros(self.out_features, self.in_features, dtype=change.dtype, device=change.device)
        start, width = self.slicefine_start[adapter_name], self.slicefine_r[adapter_name]
        if self.slicefine_mode[adapter_name] == "column":
            delta[:, start : start + width] = change
        else:
            delta[start : start + width, :] = change
        return delta


class SliceFineLinear(nn.Module, SliceFineLayer):
    """An ``nn.Linear`` whose slice of columns or rows is trainable."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        r: int = 8,
        slice_mode: str = "column",
        slice_position: int = 0,
        **kwargs,
    ) -> None:
        super().__init__()
        SliceFineLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, slice_mode, slice_position, **kwargs)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        weight = self.get_base_layer().weight
        for name in adapter_names:
            if name not in self.slicefine_slice:
                continue
            start, width = self.slicefine_start[name], self.slicefine_r[name]
            view = (
                weight.data[:, start : start + width]
                if self.slicefine_mode[name] == "column"
                else weight.data[start : start + width, :]
            )
            new = self.slicefine_slice[name].detach().to(weight.dtype)
            if safe_merge and not torch.isfinite(new).all():
                raise ValueError(f"NaNs detected in the slice of adapter {name}; not merging it")
            self._slicefine_unmerged[name] = view.clone()
            view.copy_(new)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        weight = self.get_base_layer().weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            original = self._slicefine_unmerged.pop(name, None)
            if original is None:
                continue
            start, width = self.slicefine_start[name], self.slicefine_r[name]
            if self.slicefine_mode[name] == "column":
                weight.data[:, start : start + width] = original
            else:
                weight.data[start : start + width, :] = original

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        for name in self.active_adapters:
            if name not in self.slicefine_slice:
                continue
            # note: base output + x @ (T - W0[slice])^T equals x @ W_eff^T without building W_eff (out x in)
            change = self.slice_change(name)
            start, width = self.slicefine_start[name], self.slicefine_r[name]
            xs = x.to(change.dtype)
            if self.slicefine_mode[name] == "column":
                result = result + (xs[..., start : start + width] @ change.T).to(result.dtype)
            else:
                rows = (xs @ change.T).to(result.dtype)
                result = torch.cat(
                    [result[..., :start], result[..., start : start + width] + rows, result[..., start + width :]],
                    dim=-1,
                )
        return result

    def __repr__(self) -> str:
        return "slicefine." + super().__repr__()


class SliceFineModel(BaseTuner):
    """peft tuner that wraps every target ``nn.Linear`` in a :class:`SliceFineLinear`."""

    prefix: str = "slicefine_"
    tuner_layer_cls = SliceFineLayer
    target_module_mapping: dict = {}

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **optional_kwargs):
        kwargs = {"r": config.r, "slice_mode": config.slice_mode, "slice_position": config.slice_position}
        if isinstance(target, SliceFineLayer):
            target.update_layer(adapter_name, **kwargs)
            return
        new_module = SliceFineLinear(target, adapter_name, **kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)


def register() -> None:
    """Make ``"SLICEFINE"`` known to peft (config, tuner and state-dict prefix); idempotent."""
    from peft import mapping

    mapping.PEFT_TYPE_TO_CONFIG_MAPPING.setdefault(SLICEFINE, SliceFineConfig)
    mapping.PEFT_TYPE_TO_TUNER_MAPPING.setdefault(SLICEFINE, SliceFineModel)
    mapping.PEFT_TYPE_TO_PREFIX_MAPPING.setdefault(SLICEFINE, SliceFineModel.prefix)


register()

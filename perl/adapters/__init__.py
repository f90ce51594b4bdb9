"""PEFT adapters: the method registry, MiLoRA / MiLoRA+ init, LoRA+ / LoRA-FA optimizers, AdaLoRA allocation,
SliceFine (a peft tuner registered with peft on import, so ``PeftModel.from_pretrained`` loads it).

Usage:
```python
from perl.adapters import PEFT_METHODS, build_adapter

setup = build_adapter(model, config.peft, total_steps=100)
print(setup.description)
```
"""

from perl.adapters.adalora import AdaLoraAllocatorCallback, fit_adalora_schedule
from perl.adapters.milora import apply_minor_init, milora_factors, milora_plus_factors
from perl.adapters.optim import lorafa_optimizer_factory, loraplus_optimizer_factory
from perl.adapters.registry import (
    ALL_METHODS,
    FULL_FINETUNING,
    PEFT_METHODS,
    AdapterSetup,
    build_adapter,
    resolve_target_modules,
)
from perl.adapters.reload import load_trained_adapter
from perl.adapters.slicefine import SliceFineConfig

__all__ = [
    "ALL_METHODS",
    "FULL_FINETUNING",
    "PEFT_METHODS",
    "SliceFineConfig",
    "AdaLoraAllocatorCallback",
    "AdapterSetup",
    "apply_minor_init",
    "build_adapter",
    "fit_adalora_schedule",
    "load_trained_adapter",
    "lorafa_optimizer_factory",
    "loraplus_optimizer_factory",
    "milora_factors",
    "milora_plus_factors",
    "resolve_target_modules",
]

"""Put a trained adapter back on its base model, exactly as it was trained.

``PeftModel.from_pretrained(base, run_dir)`` is right for most methods but not for MiLoRA: training
ran on the *residual* base ``W - s B0 A0``, and the saved ``adapter_config.json`` is a plain LoRA one,
so peft would put the trained ``B, A`` on the original ``W`` and the model would be off by the
minor component ``s B0 A0``. (PiSSA's config does say ``init_lora_weights="pissa"``, so peft redoes
the SVD on load; with ``pissa_niter > 0`` that SVD is randomised and only the registry's seeded
build reproduces it.) :func:`load_trained_adapter` therefore rebuilds the adapter with the registry,
which recomputes the residual deterministically, and then loads the saved adapter tensors.
AdaLoRA goes through peft, which trims its matrices to the saved rank pattern. HRA (peft's) and
SliceFine (ours, :mod:`perl.adapters.slicefine`, registered with peft on import) take the same
rebuild-and-load path; a SliceFine adapter holds the trained slices, put back in place of the
base values. A ``full`` run has no adapter: :func:`perl.evaluate.load_for_eval` loads its saved model.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from perl.adapters.registry import ADAPTER_NAME, FULL_FINETUNING, build_adapter

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def load_trained_adapter(model: nn.Module, peft_cfg, adapter_dir) -> nn.Module:
    """Wrap ``model`` (the *original* base model) with the adapter saved in ``adapter_dir``, in eval mode.

    Usage:
    ```python
    model = load_trained_adapter(base_model, config.peft, "runs/milora")
    ```

    Args:
        model (`nn.Module`): the base model the run started from (modified in place).
        peft_cfg: the run's ``peft`` config section (from its ``config.yaml``).
        adapter_dir (`str | Path`): the folder with ``adapter_config.json`` and ``adapter_model.safetensors``.

    Returns:
        The peft model, every parameter frozen, in eval mode.
    """
    from peft import PeftModel
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    method = str(peft_cfg.type).lower()
    if method == FULL_FINETUNING:
        raise ValueError(
            "a 'full' run saves the whole model, not an adapter; load it with from_pretrained from the run folder"
        )
    weights = adapter_dir / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(
            f"{str(adapter_dir)!r} has no {ADAPTER_WEIGHTS}; point at a finished run or a checkpoint-N folder"
        )
    if method == "adalora":
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir), adapter_name=ADAPTER_NAME)
    else:
        peft_model = build_adapter(model, peft_cfg, total_steps=2).model
        state = load_file(str(weights))
        result = set_peft_model_state_dict(peft_model, state, adapter_name=ADAPTER_NAME)
        # note: only parameters count; VeRA's shared projections are buffers regenerated from their seed
        params = {name for name, _ in peft_model.named_parameters()}
        missing = [k for k in result.missing_keys if k in params and f".{ADAPTER_NAME}" in k]
        if result.unexpected_keys or missing:
            raise ValueError(
                f"the adapter in {str(adapter_dir)!r} does not fit a {method} adapter built from this config "
                f"(unexpected or missing tensors such as {(result.unexpected_keys or missing)[0]}); "
                f"load it with the run's own config.yaml"
            )
    peft_model.requires_grad_(False)
    return peft_model.eval()

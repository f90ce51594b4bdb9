"""FSDP2 on CPU: the model sharded by ``fully_shard``, the trackers driven as the Trainer drives them.

Accelerate 1.15 enables FSDP only on GPU-type machines, so on a CPU-only machine this script does
what accelerate's FSDP2 path does (one ``fully_shard`` per decoder layer, then the root, over a
gloo process group) and runs the Trainer's optimizer-step sequence by hand: backward, clip
(``clip_grad_norm_`` returns the pre-clip total), gradient ``log_step``, ``optimizer.step()``,
``log_update``, ``zero_grad``, spectral / alignment snapshots. The loss is a causal-LM loss on
Countdown prompts (GRPO's generation is not what is under test: the trackers are). Every rank
uses the same batch, so the averaged FSDP2 gradient equals the one-process gradient.

Usage (2 processes; without torchrun it runs one unsharded process, the reference):
    torchrun --nproc_per_node 2 tests/fsdp2_driver.py OUT_DIR [STEPS] [MAX_GRAD_NORM] [METHOD]
    python tests/fsdp2_driver.py OUT_DIR [STEPS] [MAX_GRAD_NORM] [METHOD]

METHOD is a ``peft.type`` (default ``lora``); ``full`` shards the plain model (no adapter);
``miss:bat`` is MiSS with ``miss_init = "bat"`` (its update reads W0, like HRA's).

Writes (rank 0) OUT_DIR/{spectral_history_final.nc, gradient_flow_final.nc, alignment_final.nc (not for full),
adapter_model.safetensors (the gathered adapter), adapter_config.json, driver.json (the
clip's totals and how many parameters were DTensors)}.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(out: Path, steps: int = 3, max_grad_norm: float = 0.01, method: str = "lora") -> None:
    from peft import PeftModel

    from perl.adapters import build_adapter
    from perl.config import TrainConfig
    from perl.models.loading import load_model_and_tokenizer
    from perl.trackers import AlignmentTracker, GradientFlowTracker, SpectralTracker

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank() if distributed else 0

    cfg = TrainConfig()
    cfg.model.model_name_or_path = "countdown-nano"
    method, _, variant = method.partition(":")
    cfg.peft.type = method
    if variant:
        cfg.peft.miss_init = variant
    torch.manual_seed(cfg.common.seed)
    model, tokenizer = load_model_and_tokenizer(
        "countdown-nano", dtype="float32", device_type="cpu", seed=cfg.common.seed
    )
    peft_model = build_adapter(model, cfg.peft, total_steps=steps).model
    decoder = peft_model.base_model.model.model if isinstance(peft_model, PeftModel) else peft_model.model
    # note: B = 0 at LoRA init; a deterministic nonzero B makes step 1's spectra and gradients nontrivial
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.01)

    if distributed:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
        for layer in decoder.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(peft_model, mesh=mesh)

    writes = rank == 0
    full = {"peft_type": method, "target_modules": cfg.peft.target_modules} if method == "full" else {}
    spectral = SpectralTracker(
        peft_model,
        log_frequency=1,
        save_dir=out,
        is_world_process_zero=writes,
        **full,
        **({"full_top_k": 2 * cfg.peft.r} if full else {}),
    )
    # note: alignment measures an adapter's factors; the config refuses it for full fine-tuning
    alignment = (
        None if full else AlignmentTracker(peft_model, log_frequency=1, save_dir=out, is_world_process_zero=writes)
    )
    gradient = GradientFlowTracker(peft_model, log_frequency=1, save_dir=out, **full)
    gradient.writes = writes
    trackers = [t for t in (spectral, alignment) if t is not None]
    if writes:
        for t in trackers:
            t.start_fresh()
        gradient.start_fresh()

    texts = [
        f"Using the numbers [{a}, {b}, {c}], create an equation that equals {a + b - c}. <answer> {a} + {b} - {c} </answer>"
        for a, b, c in [(3, 5, 2), (7, 1, 4), (9, 6, 8), (2, 2, 3)]
    ]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)

    for t in trackers:
        t.log_step(0)
    totals = []
    for step in range(1, steps + 1):
        loss = peft_model(**batch, labels=labels).loss
        loss.backward()
        total = torch.nn.utils.clip_grad_norm_([p for p in peft_model.parameters() if p.requires_grad], max_grad_norm)
        if hasattr(total, "full_tensor"):
            total = total.full_tensor()
        totals.append(float(total))
        gradient.log_step(step, total_grad_norm=total, max_grad_norm=max_grad_norm)
        optimizer.step()
        gradient.log_update()
        optimizer.zero_grad(set_to_none=True)
        spectral.log_step(step)
        if alignment is not None:
            alignment.log_step(step, final=step == steps)

    # the adapter as a whole, for the test's independent dense SVD (every rank gathers, rank 0 writes)
    state = {}
    for name, p in peft_model.named_parameters():
        if p.requires_grad:
            full = p.detach().full_tensor() if hasattr(p, "full_tensor") else p.detach()
            state[name] = full.clone().contiguous()
    if writes:
        from safetensors.torch import save_file

        gradient.finalize()
        for t in trackers:
            t.save()
        save_file(state, str(out / "adapter_model.safetensors"))
        if isinstance(peft_model, PeftModel):
            peft_config = next(iter(peft_model.peft_config.values()))
            (out / "adapter_config.json").write_text(
                json.dumps({"r": peft_config.r, "lora_alpha": getattr(peft_config, "lora_alpha", None)})
            )
        from perl.trackers.sharding import is_dtensor

        sharded = sum(is_dtensor(p) for p in peft_model.parameters())
        (out / "driver.json").write_text(json.dumps({"clip_totals": totals, "dtensor_parameters": sharded}))
    if distributed:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(
        Path(sys.argv[1]),
        int(sys.argv[2]) if len(sys.argv) > 2 else 3,
        float(sys.argv[3]) if len(sys.argv) > 3 else 0.01,
        sys.argv[4] if len(sys.argv) > 4 else "lora",
    )

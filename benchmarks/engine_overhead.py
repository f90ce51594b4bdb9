"""Cost of tracking under each engine, relative to one process: a spectral snapshot and a gradient capture.

Shapes: Qwen2.5-1.5B's seven projections per block (hidden 1536, intermediate 8960, 2 KV heads
of 128) with LoRA r=16 on all of them, for BLOCKS blocks (default 4 of the model's 28: the ratio
does not depend on the count, and 28 frozen fp32 blocks in each of 2 processes would not fit this
machine next to other work). Engines, 2 CPU processes each under torchrun (gloo): DDP, DeepSpeed
ZeRO-2, ZeRO-3 (DS_ACCELERATOR=cpu), FSDP2 (``fully_shard`` per block). Measured on every rank,
reported as rank 0's wall time (the others wait for it in the collectives):

- snapshot: ``SpectralTracker.log_step`` (ZeRO-3 / FSDP2: each module's adapter gathered in turn);
- alignment: ``AlignmentTracker.log_step`` after its one-off base SVD (randomized for these shapes,
  no intruders); ZeRO-3 / FSDP2 gather each base weight W0 in turn for ``W0 @ V``;
- gradient capture: what the gradient tracker does per logged step (DeepSpeed: the engine-hook
  ``capture_gradients`` + ``log_step``; others: ``log_step``), and ``log_update`` after the step.

Usage:
    .venv/bin/python benchmarks/engine_overhead.py [--blocks 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

HIDDEN, INTER, KV = 1536, 8960, 256
SHAPES = {
    "q_proj": (HIDDEN, HIDDEN),
    "k_proj": (HIDDEN, KV),
    "v_proj": (HIDDEN, KV),
    "o_proj": (HIDDEN, HIDDEN),
    "gate_proj": (HIDDEN, INTER),
    "up_proj": (HIDDEN, INTER),
    "down_proj": (INTER, HIDDEN),
}
ENGINES = ("ddp", "ds_zero2", "ds_zero3", "fsdp2")


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = nn.Module()
        self.mlp = nn.Module()
        for name, (n_in, n_out) in SHAPES.items():
            parent = self.mlp if name in ("gate_proj", "up_proj", "down_proj") else self.self_attn
            setattr(parent, name, nn.Linear(n_in, n_out, bias=False))

    def forward(self, x):
        a, m = self.self_attn, self.mlp
        h = x + a.o_proj(a.q_proj(x) + a.k_proj(x).repeat(1, 1, HIDDEN // KV) + a.v_proj(x).repeat(1, 1, HIDDEN // KV))
        return h + m.down_proj(m.gate_proj(h) * m.up_proj(h))


class Stack(nn.Module):
    def __init__(self, blocks: int):
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList(Block() for _ in range(blocks))

    def forward(self, x):
        for layer in self.model.layers:
            x = layer(x)
        return x.pow(2).mean()


def build(blocks: int):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = Stack(blocks)
    for p in model.parameters():
        p.requires_grad_(False)
    peft = get_peft_model(
        model, LoraConfig(r=16, lora_alpha=32, target_modules=list(SHAPES), init_lora_weights="gaussian")
    )
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1e-3)
    return peft


def measure(engine: str, blocks: int, repeats: int) -> dict:
    """One engine in this process (under torchrun for the 2-process engines); rank 0 returns times."""
    from perl.trackers import AlignmentTracker, GradientFlowTracker, SpectralTracker

    dist = engine != "single"
    if dist:
        if engine.startswith("ds_"):
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            import deepspeed

            deepspeed.init_distributed(dist_backend="gloo")
        else:
            torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank() if dist else 0
    model = build(blocks)
    trainable = [p for p in model.parameters() if p.requires_grad]
    x = torch.randn(1, 4, HIDDEN, generator=torch.Generator().manual_seed(1))
    engine_obj = None
    if engine == "ddp":
        wrapped = nn.parallel.DistributedDataParallel(model)
        optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    elif engine == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
        for layer in model.base_model.model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        wrapped, trainable = model, [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    elif engine.startswith("ds_"):
        import deepspeed

        stage = int(engine[-1])
        config = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": 1.0,
            "zero_optimization": {"stage": stage},
            "zero_allow_untested_optimizer": True,
        }
        engine_obj, optimizer, _, _ = deepspeed.initialize(
            model=model, model_parameters=trainable, config=config, optimizer=torch.optim.AdamW(trainable, lr=1e-3)
        )
        wrapped = engine_obj
    else:
        wrapped = model
        optimizer = torch.optim.AdamW(trainable, lr=1e-3)

    folder = Path(tempfile.mkdtemp(prefix=f"perl-engine-{engine}-{rank}-"))
    spectral = SpectralTracker(model, log_frequency=1, save_dir=folder, is_world_process_zero=rank == 0)
    alignment = AlignmentTracker(
        model,
        log_frequency=1,
        save_dir=folder,
        intruder_log_frequency=0,
        full_svd_max_dim=256,
        save_base_svd=False,
        is_world_process_zero=rank == 0,
    )
    gradient = GradientFlowTracker(model, log_frequency=1, save_dir=folder)
    gradient.writes = rank == 0
    snap, grad, align = [], [], []
    for step in range(1, repeats + 2):
        loss = wrapped(x)
        if engine_obj is not None:
            engine_obj.backward(loss)
        else:
            loss.backward()
        if dist:
            torch.distributed.barrier()
        start = time.perf_counter()
        if engine_obj is not None:
            gradient.capture_gradients()  # what the engine hook does before the engine's step
            total = None
        else:
            total = torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            total = total.full_tensor() if hasattr(total, "full_tensor") else total
        gradient.log_step(step, total_grad_norm=total, max_grad_norm=1.0 if total is not None else None)
        capture = time.perf_counter() - start
        if engine_obj is not None:
            engine_obj.step()
        else:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        start = time.perf_counter()
        gradient.log_update()
        capture += time.perf_counter() - start
        if dist:
            torch.distributed.barrier()
        start = time.perf_counter()
        spectral.log_step(step)
        snapshot = time.perf_counter() - start
        if dist:
            torch.distributed.barrier()
        start = time.perf_counter()
        alignment.log_step(step)
        aligned = time.perf_counter() - start
        if step > 1:  # the first step warms caches and the netCDF store up (and takes the base SVD)
            snap.append(snapshot)
            grad.append(capture)
            align.append(aligned)
    if dist:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return {
        "snapshot": statistics.median(snap),
        "alignment": statistics.median(align),
        "gradient": statistics.median(grad),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--engine", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.engine is not None:  # a worker under torchrun
        result = measure(args.engine, args.blocks, args.repeats)
        if int(os.environ.get("RANK", "0")) == 0:
            Path(args.out).write_text(json.dumps(result))
        return

    base = measure("single", args.blocks, args.repeats)
    print(
        f"Qwen2.5-1.5B LoRA r=16 shapes, {args.blocks} blocks x 7 projections; median of {args.repeats}; "
        f"2 CPU processes (gloo) per engine"
    )
    keys = ("snapshot", "alignment", "gradient")
    print(f"{'engine':10s}" + "".join(f" {k + ' s':>12s} {'/ single':>9s}" for k in keys))
    print(f"{'single':10s}" + "".join(f" {base[k]:12.3f} {1.0:9.2f}" for k in keys))
    torchrun = Path(sys.executable).with_name("torchrun")
    for engine in ENGINES:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "result.json"
            cmd = [
                str(torchrun),
                "--nproc_per_node",
                "2",
                "--master_port",
                "29655",
                __file__,
                "--engine",
                engine,
                "--blocks",
                str(args.blocks),
                "--repeats",
                str(args.repeats),
                "--out",
                str(out),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            if proc.returncode != 0:
                print(
                    f"{engine:10s} failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}"
                )
                continue
            r = json.loads(out.read_text())
        print(f"{engine:10s}" + "".join(f" {r[k]:12.3f} {r[k] / base[k]:9.2f}" for k in keys))


if __name__ == "__main__":
    main()

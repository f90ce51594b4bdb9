"""Cost of alignment tracking at Qwen2.5-1.5B shapes, against one spectral snapshot.

Qwen2.5-1.5B: 28 blocks; hidden 1536, intermediate 8960, k/v out 256; LoRA r=16 on q, k, v, o,
gate, up, down (196 modules). Alignment needs the real base weights (their SVD, and ``W0 @ V_dW``),
and 28 blocks of float32 random weights take 5 GB, so this measures ONE block with real random
weights (7 modules, every shape) and extrapolates x 28 (each block costs the same: same shapes).
The spectral snapshot, which never touches the base weights, is measured on all 28 blocks (base
weights on the meta device, as in ``benchmarks/spectral_snapshot.py``) and, for the per-block
comparison, on the same one-block model.

Printed:
- the one-off base SVD (``AlignmentTracker``'s first snapshot: full float64 SVD of every W0, top and
  bottom k = 2r = 32 vectors, W0's full left basis kept for intruders), per block and x 28;
- one alignment snapshot (energy fractions, principal angles, amplification factor) per block and
  x 28, and the ratio to one spectral snapshot of the whole model;
- with ``--intruders``: one intruder snapshot (top-k singular vectors of every dense tuned weight,
  W0's left bases cached; tens of seconds per block on 2 cores, so off by default to keep the run
  under ~3 minutes).

    python benchmarks/alignment_snapshot.py [--repeats N] [--threads N] [--nonzero-init] [--intruders]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from spectral_snapshot import TARGETS, best_of, qwen15b_lora, train_like

BLOCKS = 28


def one_block_lora(r: int = 16, nonzero_init: bool = False, seed: int = 0):
    """One Qwen2.5-1.5B block with real random base weights and a LoRA r adapter on all 7 linears."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=1024,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=1,
        num_attention_heads=12,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = Qwen2ForCausalLM(config)
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS))
    if nonzero_init:
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(generator=gen).mul_(0.01)
    return model


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats of the snapshots; the best is reported")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--nonzero-init", action="store_true", help="B_0 != 0: the general 2r update path")
    parser.add_argument("--intruders", action="store_true", help="also time one intruder snapshot (slow)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from perl.trackers.alignment import AlignmentTracker
    from perl.trackers.spectral import SpectralTracker

    block = one_block_lora(nonzero_init=args.nonzero_init)
    tmp = tempfile.mkdtemp(prefix="alignment_bench_")
    alignment = AlignmentTracker(block, save_dir=f"{tmp}/a", intruder_log_frequency=1, save_base_svd=False)
    spectral_block = SpectralTracker(block, save_dir=f"{tmp}/s1")
    train_like(block)
    print(
        f"1 block with real random weights, 7 LoRA modules, r=16, k=32, torch threads={torch.get_num_threads()}, "
        f"update path: {'general (B_0 != 0)' if args.nonzero_init else 'B_0 = 0 shortcut'}",
        flush=True,
    )

    start = time.perf_counter()
    alignment._ensure_base()
    t_base = time.perf_counter() - start
    print(
        f"one-off base SVD (7 weights, full float64): {t_base:.1f} s per block -> {t_base * BLOCKS / 60:.1f} min "
        f"for {BLOCKS} blocks (extrapolated); W0 left bases cached: {alignment._cache_used / 2**20:.0f} MB per block",
        flush=True,
    )

    t_align, snap = best_of(lambda: alignment.snapshot(1), args.repeats)
    t_spec_block, _ = best_of(lambda: spectral_block.snapshot(1), args.repeats)
    frac = snap.energy_fraction_top_left.values
    print(
        f"alignment snapshot: {t_align:.3f} s per block -> {t_align * BLOCKS:.2f} s for {BLOCKS} blocks "
        f"(extrapolated); top-k left energy fraction mean {np.nanmean(frac):.4f} "
        f"(chance k/m ~ {float(snap.chance_energy_fraction_left.mean()):.4f})",
        flush=True,
    )

    full = qwen15b_lora(nonzero_init=args.nonzero_init)
    spectral = SpectralTracker(full, save_dir=f"{tmp}/s28")
    train_like(full)
    t_spec, _ = best_of(lambda: spectral.snapshot(1), args.repeats)
    print(f"spectral snapshot: {t_spec:.3f} s for {BLOCKS} blocks (measured; {t_spec_block:.3f} s for the one block)")
    print(
        f"ratio alignment / spectral snapshot, whole model: {t_align * BLOCKS / t_spec:.1f}x   "
        f"(per block: {t_align / t_spec_block:.1f}x)",
        flush=True,
    )

    if args.intruders:
        t_intr, snap = best_of(lambda: alignment.snapshot(1, intruders=True), 1)
        t_intr -= t_align
        print(
            f"intruder snapshot (7 dense tuned weights, W0 bases cached): {t_intr:.1f} s per block -> "
            f"{t_intr * BLOCKS / 60:.1f} min for {BLOCKS} blocks (extrapolated); "
            f"ratio to a spectral snapshot: {t_intr * BLOCKS / t_spec:.0f}x; intruders found: "
            f"{int(snap.intruder_dimensions.sum())}"
        )


if __name__ == "__main__":
    main()

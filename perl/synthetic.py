"""Run folders of any shape in seconds, written by the real trackers on a tiny random model.

The explorers, the report and their benchmarks need runs of chosen sizes (1000 steps x 28 layers,
a DoRA run, a run still training) without a GRPO training of hours. :func:`synthetic_run` builds
a randomly initialised Qwen2 of the requested depth, wraps it with the real adapter
(`perl.adapters.build_adapter`), and trains it for ``steps`` optimizer steps on a language-model
loss over random tokens while the real :class:`~perl.trackers.SpectralTracker` and
:class:`~perl.trackers.GradientFlowTracker` record it. So the stores have exactly the schema,
units and attributes of a real run's (they come from the same code), and every stored number is
a real measurement of a real adapter. Only the Trainer's own metrics are invented: ``metrics.jsonl``
holds a rising reward with TRL's log keys (written by the same `MetricsCallback`), since random
tokens earn no Countdown reward. The run's attributes say so (``source``).

Usage:
```python
from perl.synthetic import synthetic_run
import perl

run_dir = synthetic_run("runs/fake", steps=50, layers=4, modules=("q_proj", "v_proj"), r=8)
perl.open_run(run_dir).spectral.singular_values.sel(layer=2, module="v_proj")
```
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import numpy as np

__all__ = ["synthetic_run"]

SOURCE = (
    "perl.synthetic: a random tiny Qwen2 trained on random tokens, tracked by the real trackers; "
    "metrics.jsonl (reward, lengths) is invented"
)


def _tiny_model(layers: int, r: int, seed: int):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    # note: k/v projections are hidden/2 wide (2 kv heads of 4): keep every adapted dimension >= r
    hidden = max(32, 8 * math.ceil(4 * r / 8))
    config = Qwen2Config(
        vocab_size=64,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config)


def synthetic_run(
    out_dir,
    steps: int = 20,
    layers: int = 4,
    modules: Sequence[str] = ("q_proj", "v_proj"),
    r: int = 8,
    seed: int = 0,
    method: str = "lora",
    every: int = 1,
    partial: Sequence[str] = (),
    final: bool = True,
    pngs: bool = True,
    learning_rate: float = 1e-2,
) -> Path:
    """Train and track a tiny random model for ``steps`` optimizer steps; return the run folder.

    Spectral snapshots are at steps ``0, every, 2*every, ..., steps`` (and ``steps``), gradient and
    metric records at ``every, 2*every, ..., steps``, as a tracked training run stores them.

    Args:
        out_dir (str | Path): the run folder; stores and metrics an earlier call left there are replaced.
        steps (int, default 20): optimizer steps.
        layers (int, default 4): transformer blocks.
        modules (sequence of str, default ("q_proj", "v_proj")): adapted in every block.
        r (int, default 8): adapter rank.
        seed (int, default 0): seed of the model, the tokens and the invented metrics.
        method (str, default "lora"): any ``peft.type`` (``dora`` adds magnitude/direction, ...).
        every (int, default 1): tracking frequency of both trackers.
        partial (sequence of str, default ()): modules adapted in block 0 only, so the other
            blocks hold NaN for them (a module a method does not adapt there).
        final (bool, default True): end the run (``*_final.nc``, summaries); False leaves it as a
            run still training (live stores only).
        pngs (bool, default True): write the gradient PNGs at the end (matplotlib, ~1 s).
        learning_rate (float, default 1e-2): AdamW's; large, so spectra move visibly in few steps.
    """
    import torch

    from perl.adapters import build_adapter
    from perl.config import TrainConfig, apply_overrides, save_config
    from perl.trackers import GradientFlowTracker, SpectralTracker
    from perl.trackers.gradient import FINAL_NAME as GRADIENT_FINAL
    from perl.train import CONFIG_FILE, METRICS_FILE, MetricsCallback, run_attributes

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / METRICS_FILE).unlink(missing_ok=True)
    targets = [*modules, *(f"model.layers.0.{_block_path(m)}" for m in partial if m not in modules)]
    cfg = apply_overrides(
        TrainConfig(),
        {
            "model.model_name_or_path": "synthetic",
            "peft.type": method,
            "peft.r": r,
            "peft.lora_alpha": 2 * r,
            "peft.target_modules": targets,
            "common.seed": seed,
            "training.output_dir": str(out),
            "training.max_steps": steps,
            "training.learning_rate": learning_rate,
            "tracker.enable_spectral_tracking": True,
            "tracker.enable_gradient_tracking": True,
            "tracker.spectral_log_frequency": every,
            "tracker.gradient_log_frequency": every,
        },
    )
    save_config(cfg, out / CONFIG_FILE)

    setup = build_adapter(_tiny_model(layers, r, seed), cfg.peft, total_steps=steps)
    model = setup.model
    attrs = {**run_attributes(cfg, model), "source": SOURCE}
    spectral = SpectralTracker(model, log_frequency=every, save_dir=out, peft_type=method, run_attrs=attrs)
    gradient = GradientFlowTracker(model, log_frequency=every, save_dir=out, peft_type=method, run_attrs=attrs)
    metrics = MetricsCallback(out / METRICS_FILE)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate)
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    max_norm = float(cfg.training.max_grad_norm)
    allocate = getattr(model.base_model, "update_and_allocate", None)  # AdaLoRA's rank budget

    spectral.start_fresh()
    gradient.start_fresh()
    spectral.log_step(0)
    for step in range(1, steps + 1):
        tokens = torch.randint(0, 64, (4, 16), generator=generator)
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        total = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if gradient.should_log(step):
            gradient.log_step(step, total_grad_norm=total, max_grad_norm=max_norm)
        optimizer.step()
        gradient.log_update()
        if allocate is not None:
            allocate(step)
        optimizer.zero_grad(set_to_none=True)
        if spectral.should_log(step):
            spectral.log_step(step)
        if step % every == 0:
            record = {"loss": loss.item(), "grad_norm": total.item(), **_invented_metrics(rng, step / steps)}
            metrics.on_log(None, SimpleNamespace(global_step=step, is_world_process_zero=True), None, logs=record)
    if final:
        if steps not in spectral.steps:
            spectral.log_step(steps)
        spectral.save()
        if pngs:
            gradient.finalize()
        elif gradient.save() is not None:
            gradient.store.finalize(out / GRADIENT_FINAL)
        state = SimpleNamespace(global_step=steps, is_world_process_zero=True)
        metrics.on_log(None, state, None, logs={"train_runtime": 1.0, "train_loss": loss.item(), "epoch": 1.0})
    return out


def _block_path(module: str) -> str:
    return f"mlp.{module}" if module in ("gate_proj", "up_proj", "down_proj") else f"self_attn.{module}"


def _invented_metrics(rng: np.random.Generator, x: float) -> dict[str, float]:
    """TRL's GRPO log keys with a reward that rises over the run (x = fraction of the run done)."""
    fmt = float(np.clip(1 / (1 + np.exp(-10 * (x - 0.3))) + 0.05 * rng.standard_normal(), 0, 1))
    eq = float(np.clip(0.6 / (1 + np.exp(-8 * (x - 0.6))) + 0.05 * rng.standard_normal(), 0, 1))
    length = float(60 - 25 * x + 3 * rng.standard_normal())
    return {
        "learning_rate": 5e-4 * (1 - x),
        "completions/mean_length": length,
        "completions/min_length": length - 20,
        "completions/max_length": length + 20,
        "rewards/format_reward/mean": fmt,
        "rewards/format_reward/std": 0.3,
        "rewards/equation_reward/mean": eq,
        "rewards/equation_reward/std": 0.2,
        "reward": fmt + eq,
        "reward_std": 0.4,
        "kl": 0.001 * x,
        "entropy": 1.5 - 0.8 * x,
    }

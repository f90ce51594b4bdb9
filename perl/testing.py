"""Small, fast training setups for tests, the seed's validation scripts and quick experiments.

``tiny-random`` (a randomly initialised two-block Qwen2) runs a real GRPO step in about a second
on a CPU. It earns no Countdown reward, so every advantage would be zero and every gradient
exactly zero; :func:`distinct_characters_reward` gives completions different rewards so that
GRPO has something to learn from.
"""

from __future__ import annotations

from pathlib import Path

from perl.config import TrainConfig


def distinct_characters_reward(completions, **kwargs) -> list[float]:
    """A reward with variance across random completions: the number of distinct characters."""
    return [float(len(set(c if isinstance(c, str) else str(c)))) for c in completions]


def tiny_train_config(
    output_dir: str | Path, max_steps: int = 2, method: str = "lora", tracking_frequency: int | None = 1
) -> TrainConfig:
    """A `TrainConfig` for ``tiny-random``: 4 completions of 12 tokens per step, 16 problems.

    Args:
        output_dir: the run folder.
        max_steps: optimizer steps.
        method: ``peft.type``.
        tracking_frequency: spectral and gradient tracking every N steps; None turns both off.
    """
    cfg = TrainConfig()
    cfg.model.model_name_or_path = "tiny-random"
    cfg.peft.type = method
    cfg.training.output_dir = str(output_dir)
    cfg.training.max_steps = max_steps
    cfg.training.max_completion_length = 12
    cfg.training.num_generations = 4
    cfg.training.per_device_train_batch_size = 4
    cfg.dataset.example_numbers = 16
    cfg.dataset.test_size = 4
    if tracking_frequency is not None:
        cfg.tracker.enable_spectral_tracking = True
        cfg.tracker.enable_gradient_tracking = True
        cfg.tracker.spectral_log_frequency = tracking_frequency
        cfg.tracker.gradient_log_frequency = tracking_frequency
    return cfg

"""Shared fixtures. One short tracked training run is made per test session and shared by every
test that reads a real run (notebooks, explorers, report, open_run), instead of training in each."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# note: on two shared cores one torch thread per process is several times cheaper than two
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

SHARED_RUN_STEPS = 6


def shared_run_config(output_dir: Path):
    from perl.config import TrainConfig

    cfg = TrainConfig()
    # note: the embedded model earns reward, so GRPO advantages and gradients are not all zero
    cfg.model.model_name_or_path = "countdown-nano"
    cfg.peft.type = "lora"
    cfg.training.output_dir = str(output_dir)
    cfg.training.max_steps = SHARED_RUN_STEPS
    cfg.training.num_generations = 8
    cfg.training.per_device_train_batch_size = 8
    cfg.dataset.example_numbers = 64
    cfg.dataset.test_size = 8
    cfg.tracker.enable_spectral_tracking = True
    cfg.tracker.enable_gradient_tracking = True
    cfg.tracker.spectral_log_frequency = 1
    cfg.tracker.gradient_log_frequency = 1
    return cfg


@pytest.fixture(scope="session")
def tracked_run(tmp_path_factory) -> Path:
    """A finished LoRA run (both trackers, frequency 1, six optimizer steps); returns its folder."""
    from perl.train import train

    out = tmp_path_factory.mktemp("shared") / "lora-run"
    train(shared_run_config(out))
    return out

"""Two GRPO steps per PEFT method through `perl.train.train`, on the randomly initialised tiny model.

The tiny model earns no Countdown reward, so a reward with variance across completions (the number
of distinct characters) gives GRPO non-zero advantages and hence non-zero gradients.
"""

from __future__ import annotations

import pytest
import torch

from perl.adapters import PEFT_METHODS, build_adapter
from perl.config import TrainConfig
from perl.models.loading import load_model
from perl.testing import distinct_characters_reward, tiny_train_config
from perl.train import train


def tiny_config(tmp_path, method: str) -> TrainConfig:
    cfg = tiny_train_config(tmp_path / method, max_steps=2, method=method, tracking_frequency=None)
    cfg.training.learning_rate = 1e-2
    return cfg


def _reference_base(cfg: TrainConfig):
    """The frozen weights a method must leave alone: the base model, or PiSSA/MiLoRA's residual base."""
    model = load_model("tiny-random", seed=cfg.common.seed)
    setup = build_adapter(model, cfg.peft, total_steps=cfg.training.max_steps)
    frozen = {n: p.detach().clone() for n, p in setup.model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in setup.model.named_parameters() if p.requires_grad}
    return frozen, trainable


@pytest.mark.parametrize("method", PEFT_METHODS)
def test_two_grpo_steps_train_adapter_and_keep_base(tmp_path, method):
    cfg = tiny_config(tmp_path, method)
    torch.manual_seed(cfg.common.seed)
    frozen0, trainable0 = _reference_base(cfg)
    result = train(cfg, reward_funcs=[distinct_characters_reward])

    assert result.global_step == 2
    assert (result.output_dir / "adapter_config.json").is_file()
    assert (result.output_dir / "config.yaml").is_file()
    params = dict(result.model.named_parameters())
    for name, before in frozen0.items():
        assert torch.equal(params[name].detach(), before), f"{method}: frozen {name} changed"
    moved = [n for n, before in trainable0.items() if not torch.equal(params[n].detach(), before)]
    assert moved, f"{method}: no trainable adapter parameter changed in two GRPO steps"
    if method == "lorafa":
        assert all("lora_A" not in n for n in trainable0), "LoRA-FA must freeze A"
    grad_norms = [h["grad_norm"] for h in result.log_history if "grad_norm" in h]
    assert grad_norms and max(grad_norms) > 0

"""The initial-state file both trackers write beside each checkpoint (perl.trackers.snapshots)."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from perl.trackers.snapshots import load_init_tensors, save_init_tensors


def _init():
    g = torch.Generator().manual_seed(0)
    return {
        "model.layers.0.self_attn.q_proj": {
            "B0": torch.randn(8, 2, generator=g),
            "A0": torch.randn(2, 6, generator=g),
        },
        "model.layers.0.mlp.down_proj": {},  # zero init: nothing kept
    }


def test_round_trip_keeps_every_tensor_and_the_metadata(tmp_path):
    init = _init()
    path = save_init_tensors(init, tmp_path / "ckpt" / "init.safetensors", "perl-test-1", zero_init="[]")
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "perl-test-1", "zero_init": "[]"}
    expected = {name: {part: tuple(t.shape) for part, t in d.items()} for name, d in init.items()}
    restored = load_init_tensors(path, expected)
    assert set(restored) == set(init)
    assert restored["model.layers.0.mlp.down_proj"] == {}
    for part, t in init["model.layers.0.self_attn.q_proj"].items():
        assert torch.equal(restored["model.layers.0.self_attn.q_proj"][part], t)


def test_no_file_is_none(tmp_path):
    assert load_init_tensors(tmp_path / "missing.safetensors", {"m": {}}) is None


def test_a_file_of_another_model_is_refused_in_one_sentence(tmp_path):
    path = save_init_tensors(_init(), tmp_path / "init.safetensors", "perl-test-1")
    with pytest.raises(ValueError, match="which this model does not have"):
        load_init_tensors(path, {"model.layers.0.mlp.down_proj": {}})
    other_rank = {"model.layers.0.self_attn.q_proj": {"B0": (8, 4), "A0": (4, 6)}, "model.layers.0.mlp.down_proj": {}}
    with pytest.raises(ValueError, match=r"initial A0 of .* has shape \(2, 6\), the model has \(4, 6\)"):
        load_init_tensors(path, other_rank)

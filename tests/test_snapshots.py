"""The initial-state file both trackers write beside each checkpoint (perl.trackers.snapshots)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from perl.trackers.snapshots import INIT_STATE_NAME, LEGACY_INIT_NAMES, load_init_tensors, save_init_tensors

Q, D = "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"


def _init():
    g = torch.Generator().manual_seed(0)
    return {Q: {"B0": torch.randn(8, 2, generator=g), "A0": torch.randn(2, 6, generator=g)}, D: {}}  # D: zero init


def _expected(init):
    return {name: {part: tuple(t.shape) for part, t in d.items()} for name, d in init.items()}


def test_round_trip_keeps_every_tensor_and_the_metadata(tmp_path):
    init = _init()
    path = save_init_tensors(init, tmp_path / "ckpt", "spectral", zero_init="[]")
    assert path == tmp_path / "ckpt" / INIT_STATE_NAME
    with safe_open(str(path), framework="pt") as f:
        entry = json.loads(f.metadata()["spectral"])
    assert entry == {"modules": sorted([Q, D]), "keys": [f"{Q}::A0", f"{Q}::B0"], "zero_init": "[]"}
    restored = load_init_tensors(tmp_path / "ckpt", "spectral", _expected(init))
    assert set(restored) == set(init) and restored[D] == {}
    for part, t in init[Q].items():
        assert torch.equal(restored[Q][part], t)


def test_both_trackers_share_one_file_and_the_same_factors_once(tmp_path):
    spectral = {**_init(), "model.norm": {"v0": torch.ones(8)}}  # a part only the spectral tracker keeps
    alignment = {name: {k: t.clone() for k, t in d.items()} for name, d in _init().items()}
    save_init_tensors(spectral, tmp_path, "spectral")
    save_init_tensors(alignment, tmp_path, "alignment")
    with safe_open(str(tmp_path / INIT_STATE_NAME), framework="pt") as f:
        assert sorted(f.keys()) == [f"{Q}::A0", f"{Q}::B0", "model.norm::v0"]  # B0, A0 stored once
    assert load_init_tensors(tmp_path, "alignment", _expected(alignment)).keys() == alignment.keys()
    assert torch.equal(load_init_tensors(tmp_path, "spectral", _expected(spectral))["model.norm"]["v0"], torch.ones(8))
    # a tracker that saved nothing here (it was off in that run) gets None, not the other's state
    save_init_tensors(spectral, tmp_path / "only", "spectral")
    assert load_init_tensors(tmp_path / "only", "alignment", _expected(alignment)) is None


def test_other_values_under_the_same_name_are_kept_apart(tmp_path):
    save_init_tensors(_init(), tmp_path, "spectral")
    other = _init()
    other[Q]["B0"] = other[Q]["B0"] + 1.0
    save_init_tensors(other, tmp_path, "alignment")
    assert torch.equal(load_init_tensors(tmp_path, "alignment", _expected(other))[Q]["B0"], other[Q]["B0"])
    assert torch.equal(load_init_tensors(tmp_path, "spectral", _expected(other))[Q]["B0"], _init()[Q]["B0"])


def test_a_checkpoint_of_an_earlier_version_is_read(tmp_path):
    init = _init()
    tensors = {f"{name}::{part}": t for name, d in init.items() for part, t in d.items()}
    save_file(tensors, str(tmp_path / LEGACY_INIT_NAMES["alignment"]), metadata={"format": "perl-alignment-init-1"})
    restored = load_init_tensors(tmp_path, "alignment", _expected(init))
    assert torch.equal(restored[Q]["A0"], init[Q]["A0"]) and restored[D] == {}
    assert load_init_tensors(tmp_path, "spectral", _expected(init)) is None


def test_no_file_is_none(tmp_path):
    assert load_init_tensors(tmp_path, "spectral", {"m": {}}) is None


def test_a_file_of_another_model_is_refused_in_one_sentence(tmp_path):
    save_init_tensors(_init(), tmp_path, "spectral")
    with pytest.raises(ValueError, match="which this model does not have"):
        load_init_tensors(tmp_path, "spectral", {D: {}})
    other_rank = {Q: {"B0": (8, 4), "A0": (4, 6)}, D: {}}
    with pytest.raises(ValueError, match=r"initial A0 of .* has shape \(2, 6\), the model has \(4, 6\)"):
        load_init_tensors(tmp_path, "spectral", other_rank)

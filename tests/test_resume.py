"""Resuming a tracked run from a checkpoint continues the same stores: no duplicated, no missing steps."""

from __future__ import annotations

import json

import numpy as np

from perl.config import TrainConfig
from perl.testing import distinct_characters_reward, tiny_train_config
from perl.trackers import RunStore
from perl.train import train


def _config(output_dir, max_steps: int) -> TrainConfig:
    cfg = tiny_train_config(output_dir, max_steps=max_steps)
    cfg.training.learning_rate = 1e-2
    cfg.training.save_strategy = "steps"
    cfg.training.save_steps = 2
    return cfg


def test_resume_continues_stores_and_metrics(tmp_path):
    out = tmp_path / "run"
    first = train(_config(out, max_steps=2), reward_funcs=[distinct_characters_reward])
    assert (out / "checkpoint-2" / "tracker_init.safetensors").is_file()
    spectral_before = RunStore.open(out / "spectral_logs" / "spectral_history.nc")

    # a crashed run may have logged past its last checkpoint: those records must not survive the resume
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"step": 3, "grad_norm": 123.0}) + "\n")
    cfg = _config(out, max_steps=4)
    cfg.training.resume_from_checkpoint = "true"
    second = train(cfg, reward_funcs=[distinct_characters_reward])
    assert (first.global_step, second.global_step) == (2, 4)

    spectral = RunStore.open(out / "spectral_history_final.nc")
    gradients = RunStore.open(out / "gradient_flow_final.nc")
    assert [int(s) for s in spectral.step.values] == [0, 1, 2, 3, 4]
    assert [int(s) for s in gradients.step.values] == [1, 2, 3, 4]
    # the steps recorded before the resume are kept as they were
    np.testing.assert_array_equal(
        spectral.singular_values.sel(step=[0, 1, 2]).values, spectral_before.singular_values.sel(step=[0, 1, 2]).values
    )
    # update since init is measured from the original init (restored from the checkpoint), so it is
    # not zero at the first step after resuming
    assert float(spectral.update_frobenius_norm.sel(step=3).max()) > 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "grad_norm" in r] == [1, 2, 3, 4]
    assert all(r.get("grad_norm") != 123.0 for r in records)

"""Integration tests of the trackers inside a real GRPO run (the seed's `python -m perl.trackers.test_integration`).

Runnable as a module and collected by pytest. One short run of the randomly initialised tiny model
with both trackers at frequency 1 checks what a user relies on: both stores exist and load with
the documented API, spectral snapshots are labelled 0..N and gradient steps 1..N on the same
numbering, and the final files hold the same data as the live stores.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

STEPS = 3


@pytest.fixture(scope="module")
def both_trackers_run(tmp_path_factory):
    from perl.testing import distinct_characters_reward, tiny_train_config
    from perl.train import train

    cfg = tiny_train_config(tmp_path_factory.mktemp("integration") / "run", max_steps=STEPS)
    return train(cfg, reward_funcs=[distinct_characters_reward])


def test_step_labels_line_up(both_trackers_run):
    from perl.trackers import GradientFlowTracker, SpectralTracker

    spectral = SpectralTracker.load(both_trackers_run.output_dir / "spectral_history_final.nc").data
    gradients = GradientFlowTracker.load(both_trackers_run.output_dir / "gradient_flow_final.nc").data
    assert list(spectral.step.values) == list(range(0, STEPS + 1))
    assert list(gradients.step.values) == list(range(1, STEPS + 1))
    logged = [h["grad_norm"] for h in both_trackers_run.log_history if "grad_norm" in h]
    np.testing.assert_allclose(gradients.total_grad_norm.values, logged, rtol=1e-4)


def test_live_and_final_stores_agree(both_trackers_run):
    import xarray as xr

    from perl.trackers import RunStore

    out = both_trackers_run.output_dir
    for live, final in (
        ("spectral_logs/spectral_history.nc", "spectral_history_final.nc"),
        ("gradient_logs/gradient_flow.nc", "gradient_flow_final.nc"),
    ):
        xr.testing.assert_identical(RunStore.open(out / live), RunStore.open(out / final))


def test_documented_api(both_trackers_run, tmp_path):
    from perl.trackers import GradientFlowTracker, SpectralTracker

    out = both_trackers_run.output_dir
    spectral = SpectralTracker.load(out / "spectral_history_final.nc")
    history = spectral.get_layer_history("model.layers.0.self_attn.q_proj")
    assert history.sizes["step"] == STEPS + 1
    assert np.isfinite(history.singular_values.values).all()
    assert spectral.get_summary_stats()
    grad = GradientFlowTracker.load(out / "gradient_flow_final.nc")
    png = tmp_path / "heatmap.png"
    grad.create_heatmap(component="B", save_path=png)
    assert png.stat().st_size > 1000
    assert (out / "gradient_logs" / "gradient_heatmap_B.png").is_file()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", "-p", "no:cacheprovider"]))

"""The file names of the original PeRL tracking docs: `.load()` of a `.pt` name opens the netCDF
store beside it (and says so), a `.pt` pickle is never unpickled, and `get_summary_stats()` has
the original's keys, computed here independently from the stored Dataset."""

from __future__ import annotations

import pickle
import shutil

import numpy as np
import pytest
import xarray as xr

from perl.trackers import GradientFlowTracker, SpectralTracker

CASES = [
    (SpectralTracker, "spectral_history_final.pt", "spectral_history_final.nc"),
    (SpectralTracker, "spectral_logs/spectral_history.pt", "spectral_logs/spectral_history.nc"),
    (GradientFlowTracker, "gradient_flow_final.pt", "gradient_flow_final.nc"),
    (GradientFlowTracker, "gradient_logs/gradient_flow.pt", "gradient_logs/gradient_flow.nc"),
]


@pytest.mark.parametrize("cls,pt_name,nc_name", CASES, ids=[c[1] for c in CASES])
def test_tracking_doc_pt_names_open_the_nc_store(tracked_run, capsys, cls, pt_name, nc_name):
    assert not (tracked_run / pt_name).exists()
    via_pt = cls.load(tracked_run / pt_name).data
    note = capsys.readouterr().err
    assert note.count("\n") == 1 and str(tracked_run / nc_name) in note and "nothing is unpickled" in note
    via_nc = cls.load(tracked_run / nc_name).data
    assert capsys.readouterr().err == ""
    xr.testing.assert_identical(via_pt, via_nc)
    # read independently: the live store is a folder of steps_<first>_<last>.nc files
    parts, store = [], tracked_run / nc_name
    files = sorted(store.glob("steps_*.nc"), key=lambda f: int(f.stem.split("_")[1])) if store.is_dir() else [store]
    for f in files:
        with xr.open_dataset(f) as ds:
            parts.append(ds.load())
    raw = xr.concat(parts, "step", data_vars="minimal") if len(parts) > 1 else parts[0]
    for name, var in raw.data_vars.items():
        if "step" in var.dims:
            np.testing.assert_array_equal(via_pt[name].values, var.values, err_msg=name)


class _Payload:
    """Unpickling this writes a file: the proof that a load unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_pt_pickle_is_never_unpickled(tmp_path):
    marker = tmp_path / "unpickled"
    (tmp_path / "spectral_history_final.pt").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ValueError, match="never unpickles"):
        SpectralTracker.load(tmp_path / "spectral_history_final.pt")
    assert not marker.exists()
    with pytest.raises(FileNotFoundError, match="gradient_flow_final.nc"):
        GradientFlowTracker.load(tmp_path / "gradient_flow_final.pt")


def test_a_pt_name_beside_a_store_prefers_the_store(tracked_run, tmp_path, capsys):
    # an old pickle lying beside a store is ignored, not read
    run = tmp_path / "run"
    shutil.copytree(tracked_run, run)
    marker = tmp_path / "unpickled"
    (run / "gradient_flow_final.pt").write_bytes(pickle.dumps(_Payload(marker)))
    data = GradientFlowTracker.load(run / "gradient_flow_final.pt").data
    assert not marker.exists() and "total_grad_norm" in data


def _stats(values) -> dict:
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    return {"mean": values.mean(), "std": values.std(), "min": values.min(), "max": values.max()}


def test_spectral_summary_has_the_original_keys(tracked_run):
    summary = SpectralTracker.load(tracked_run).get_summary_stats()
    with xr.open_dataset(tracked_run / "spectral_history_final.nc") as ds:
        ds = ds.load()
    steps = [int(s) for s in ds.step.values]
    assert summary["total_steps_logged"] == len(steps) and summary["step_range"] == [steps[0], steps[-1]]
    # a LoRA run on every target module: each (layer, module) is an adapted module
    assert summary["num_layers"] == ds.sizes["layer"] * ds.sizes["module"]
    for metric in ("effective_rank", "condition_number", "spectral_gap", "frobenius_norm"):
        expected = _stats(ds[metric].sel(step=steps[-1]).values)
        for key, value in expected.items():
            # the store holds float32 (the weights' precision); the summary is computed from it
            assert summary[f"{metric}_latest"][key] == pytest.approx(value, rel=1e-6), (metric, key)


def test_gradient_summary_has_the_original_keys(tracked_run):
    summary = GradientFlowTracker.load(tracked_run / "gradient_flow_final.pt").get_summary_stats()
    with xr.open_dataset(tracked_run / "gradient_flow_final.nc") as ds:
        ds = ds.load()
    steps = [int(s) for s in ds.step.values]
    assert summary["total_steps_logged"] == len(steps) and summary["step_range"] == [steps[0], steps[-1]]
    layers = [int(v) for v in ds.layer.values if (ds["numel"].sel(layer=v) > 0).any()]
    assert summary["num_layers"] == len(layers) and summary["layer_range"] == [min(layers), max(layers)]
    assert set(summary["components_tracked"]) == {"A", "B"}
    # every tracked parameter's gradient norm at every step: LoRA has one A and one B per module
    g = ds["grad_norm"].sel(component=["A", "B"]).values
    for key, value in _stats(g).items():
        assert summary["overall_stats"][key] == pytest.approx(value, rel=1e-9), key
    for component in ("A", "B"):
        last = ds["grad_norm"].sel(component=component).isel(step=-1)
        per_layer = np.sqrt((last**2).sum("module")).values  # L2 over the layer's modules
        assert summary["component_stats_final"][component]["mean"] == pytest.approx(per_layer.mean(), rel=1e-9)
        assert summary["component_stats_final"][component]["max"] == pytest.approx(per_layer.max(), rel=1e-9)

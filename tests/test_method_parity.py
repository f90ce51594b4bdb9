"""The original PeRL's methods through the command line: ``hra``, ``slicefine`` and ``full``.

One subprocess run per method (``python run.py``, 2 GRPO steps, spectral + gradient tracking every
step, tiny batch on countdown-nano), shared by the tests of this module. Each test reloads what the
run saved (the adapter through ``perlwb eval``'s loader, the fully fine-tuned weights) and checks the
stored spectra against a dense SVD of the actual weight change, computed here independently, and
the ``gradient/*`` scalars in ``metrics.jsonl`` against the gradient store.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from engines import accelerate_launch

REPO = Path(__file__).resolve().parents[1]
STEPS = 2
R = 8
METHODS = ("hra", "slicefine", "full")


def run_cli(method: str, out: Path, engine: str = "single") -> Path:
    """``python run.py`` (one process), or ``accelerate launch`` of it on 2 processes under ``engine``."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    flags = [
        "--enable_tracking",
        "--tracking_frequency",
        "1",
        "--config.peft.type",
        method,
        "--config.peft.r",
        str(R),
        "--config.model.model_name_or_path",
        "countdown-nano",
        "--config.training.max_steps",
        str(STEPS),
        "--config.training.num_generations",
        "4",
        "--config.training.per_device_train_batch_size",
        "4",
        "--config.training.max_completion_length",
        "48",
        "--config.dataset.example_numbers",
        "16",
        "--config.dataset.test_size",
        "4",
        "--config.training.output_dir",
        str(out),
    ]
    if method == "slicefine":
        # note: a row slice away from index 0 exercises the position and the row form
        flags += ["--config.peft.slicefine_mode", "row", "--config.peft.slicefine_position", "5"]
    command = [sys.executable, str(REPO / "run.py")] if engine == "single" else accelerate_launch(engine)
    proc = subprocess.run(
        [*command, *flags],
        cwd=out.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """method -> its run folder, trained on first use (one run per method for the whole module)."""
    runs: dict[str, Path] = {}

    def get(method: str) -> Path:
        if method not in runs:
            runs[method] = run_cli(method, tmp_path_factory.mktemp(method) / "run")
        return runs[method]

    return get


@pytest.fixture(params=METHODS)
def cli_run(request, cli_runs) -> tuple[str, Path]:
    return request.param, cli_runs(request.param)


def _final(run: Path, name: str) -> xr.Dataset:
    with xr.open_dataset(run / name) as ds:
        return ds.load()


def _dense_changes(method: str, run: Path) -> dict[tuple[int, str], torch.Tensor]:
    """(layer, module) -> the weight change W_eff - W0 (float64) of the saved run, computed densely."""
    from perl.evaluate import load_for_eval
    from perl.models.loading import load_model

    base = {n: p.detach().double() for n, p in load_model("countdown-nano").named_parameters()}
    if method == "full":
        from safetensors.torch import load_file

        trained = load_file(str(run / "model.safetensors"))
        out = {}
        for name, w in trained.items():
            parts = name.split(".")
            if name.endswith("_proj.weight") and parts[:2] == ["model", "layers"]:
                out[(int(parts[2]), parts[4])] = w.double() - base[name]
        return out
    # the loader `perlwb eval` uses: base model + the saved adapter
    model, _, _ = load_for_eval(str(run))
    model = model.double()
    out = {}
    for name, m in model.named_modules():
        parts = name.split(".")
        if not hasattr(m, "get_base_layer") or parts[-1] not in (
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ):
            continue
        w0 = m.get_base_layer().weight.detach()
        with torch.no_grad():
            if method == "hra":
                # peft's own HRA maths: the effective weight is W0 @ H, get_delta_weight returns H
                delta = w0 @ m.get_delta_weight("default") - w0
            else:
                delta = m.get_delta_weight("default")
        out[(int(parts[parts.index("layers") + 1]), parts[-1])] = delta
    return out


def test_cli_run_spectra_equal_dense_svd_of_the_saved_weight_change(cli_run):
    _check_spectra(*cli_run)


@pytest.mark.distributed
@pytest.mark.parametrize("method", METHODS)
def test_zero3_run_spectra_and_gradients_equal_the_saved_weights(method, tmp_path):
    """Under DeepSpeed ZeRO-3 (2 processes, every weight partitioned) the same checks hold: the
    base weight HRA's change is read through is gathered with the factors, SliceFine reads its own
    copy of W0's slice, and full fine-tuning's weights are gathered one module at a time."""
    run = run_cli(method, tmp_path / "run", engine="ds_zero3")
    _check_spectra(method, run)
    _check_gradient_scalars(method, run)


def _check_spectra(method: str, run: Path) -> None:
    ds = _final(run, "spectral_history_final.nc")
    assert [int(s) for s in ds.step.values] == [0, 1, 2] and ds.attrs["peft_type"] == method
    changes = _dense_changes(method, run)
    assert len(changes) == 4 * 7  # countdown-nano: 4 blocks x 7 projections, all tracked
    moved = 0
    for (layer, module), delta in changes.items():
        want = torch.linalg.svdvals(delta).numpy()
        stored = ds.update_singular_values.sel(step=STEPS, layer=layer, module=module).values
        stored = stored[~np.isnan(stored)]
        if method == "full":
            k = 2 * R
            assert ds.attrs["full_finetuning_top_k"] == k and stored.size == k
            # randomized SVD (torch.svd_lowrank): close to the exact top-k, not bit-equal
            np.testing.assert_allclose(stored, want[:k], rtol=0, atol=1e-3 * want[0])
            np.testing.assert_allclose(
                ds.singular_values.sel(step=STEPS, layer=layer, module=module).values, stored, rtol=0, atol=0
            )
        else:
            # exactly low rank: at most r nonzero values, and the stored ones are all of them
            assert want[R] <= 1e-9 * max(want[0], 1e-300), (layer, module, want[: R + 2])
            # stored in float32 (the weights' precision, attr stored_float_precision): 1e-6 of sigma_1
            np.testing.assert_allclose(stored[:R], want[:R], rtol=0, atol=1e-6 * max(want[0], 1e-300))
            assert np.all(stored[R:] <= 1e-6 * max(want[0], 1e-300))
            assert ds.numerical_rank.sel(step=STEPS, layer=layer, module=module) <= R
            product = ds.singular_values.sel(step=STEPS, layer=layer, module=module).values
            np.testing.assert_allclose(product[:R], want[:R], rtol=0, atol=1e-6 * max(want[0], 1e-300))
        moved += want[0] > 0
        # step 0 is before the first update: nothing changed yet
        assert np.nansum(ds.update_singular_values.sel(step=0, layer=layer, module=module).values) == 0.0
    assert moved == len(changes), "every tracked module should have moved in two steps"
    # step 0: the change is exactly zero (HRA's paired reflections too), so the metrics follow the
    # documented zero-matrix conventions instead of describing rounding noise
    assert float(ds.frobenius_norm.sel(step=0).max()) == 0.0 == float(ds.effective_rank.sel(step=0).max())
    assert np.isnan(ds.condition_number.sel(step=0).values).all()


def test_cli_run_gradient_scalars_in_metrics_equal_the_store(cli_run):
    _check_gradient_scalars(*cli_run)


def _check_gradient_scalars(method: str, run: Path) -> None:
    grad = _final(run, "gradient_flow_final.nc")
    component = {"hra": "u", "slicefine": "slice", "full": "weight"}[method]
    assert list(grad.component.values) == [component]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "gradient/step" in r]
    assert [int(r["gradient/step"]) for r in logged] == [1, 2] == [int(s) for s in grad.step.values]
    for record in logged:
        step = int(record["gradient/step"])
        assert record["step"] == step  # logging_steps = 1: each record carries its own step's gradients
        at = grad.sel(step=step)
        assert record["gradient/total_pre_clip"] == pytest.approx(float(at.total_grad_norm), rel=1e-12)
        assert record["gradient/clip_coef"] == pytest.approx(float(at.clip_coef), rel=1e-12)
        # the Trainer's own grad_norm is the same pre-clip total
        assert record["gradient/total_pre_clip"] == pytest.approx(record["grad_norm"], rel=1e-5)
        for module in grad.module.values:
            values = at.grad_norm.sel(component=component, module=module).values
            expected = float(np.sqrt(np.sum(values[np.isfinite(values)] ** 2)))
            assert record[f"gradient/{component}/{module}"] == pytest.approx(expected, rel=1e-12)
        assert not any(
            k.startswith("gradient/")
            and k.split("/")[1] not in ("step", "total_pre_clip", "clip_coef", "total_post_clip", component)
            for k in record
        )


def test_cli_run_reloads_for_perl_eval(cli_run, capsys):
    from perl.evaluate import main

    method, run = cli_run
    assert (
        main([str(run), "--n", "4", "--batch-size", "4", "--max-new-tokens", "16", "--no-progress", "--threads", "1"])
        == 0
    )
    out = capsys.readouterr().out
    assert ("full fine-tuning run" if method == "full" else f"{method} adapter") in out
    assert "greedy" in out and "sample T=1" in out


def test_gradient_notebook_runs_on_a_full_fine_tuning_run(cli_runs, tmp_path):
    """Notebook 03 picks the component a method has (``weight`` here) instead of assuming LoRA's B."""
    import nbformat
    import papermill

    run = cli_runs("full")
    out = tmp_path / "03.out.ipynb"
    papermill.execute_notebook(
        str(REPO / "notebooks" / "03_gradient_explorer.ipynb"),
        str(out),
        parameters={"run_dir": str(run)},
        kernel_name="python3",
        cwd=str(tmp_path),
        progress_bar=False,
    )
    text = json.dumps(nbformat.read(out, as_version=4).cells)
    assert "No A and B factors in this full run; components: ['weight']" in text


# ------------------------------------------------------------------------------ factors, no training
@pytest.mark.parametrize(
    "method, knobs",
    [
        ("hra", {}),
        ("hra_gs", {}),
        ("slicefine", {"slicefine_mode": "column", "slicefine_position": 3}),
        ("slicefine", {"slicefine_mode": "row", "slicefine_position": 500}),
    ],
)
def test_factors_reproduce_the_layer_output(method, knobs):
    """B @ A from discovery is the weight change the layer applies, for generic (not near-identity) weights."""
    from perl.adapters import build_adapter
    from perl.config import PeftConfig
    from perl.models.loading import load_model
    from perl.trackers.discovery import discover_adapters

    if method == "hra_gs":  # peft's Gram-Schmidt HRA, built with peft directly (the registry uses the product form)
        from peft import HRAConfig, get_peft_model

        config = HRAConfig(r=R, apply_GS=True, init_weights=False, target_modules=["q_proj", "down_proj"])
        model, method = get_peft_model(load_model("countdown-nano"), config), "hra"
    else:
        model = build_adapter(load_model("countdown-nano"), PeftConfig(type=method, r=R, **knobs), total_steps=2).model
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                # note: random u makes the r reflections distinct, so their order matters
                noise = torch.randn(p.shape, generator=gen)
                p.copy_(noise if method == "hra" else p + 0.1 * noise)
    model = model.double().eval()
    for am in discover_adapters(model):
        layer = am.peft_module
        b, a, s = am.factors()
        assert b.shape[1] == a.shape[0] == R
        eye = torch.eye(layer.in_features, dtype=torch.float64)
        with torch.no_grad():
            applied = (layer(eye) - layer.get_base_layer()(eye)).T  # the layer's own weight change, out x in
        torch.testing.assert_close(s * (b.double() @ a.double()), applied, rtol=0, atol=1e-10)


def test_lowrank_singular_values_are_the_top_k_and_leave_training_rng_alone():
    from perl.trackers.spectral_math import lowrank_singular_values

    gen = torch.Generator().manual_seed(1)
    u, _ = torch.linalg.qr(torch.randn(300, 120, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(200, 120, generator=gen, dtype=torch.float64))
    sigma = 0.8 ** torch.arange(120, dtype=torch.float64)
    w = (u * sigma) @ v.T
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    top = lowrank_singular_values(w.float(), 16)
    assert torch.equal(torch.rand(3), expected_next)  # the tracker must not shift training's random stream
    torch.testing.assert_close(top, sigma[:16], rtol=0, atol=1e-5)  # float32 accuracy
    assert torch.equal(lowrank_singular_values(w.float(), 16), top)  # seeded: reproducible
    assert torch.isnan(lowrank_singular_values(torch.full((40, 30), float("nan")), 4)).all()


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"peft.type": "hra", "peft.r": "7"}, ["peft.r (7) must be even for hra"]),
        ({"peft.type": "slicefine", "peft.slicefine_mode": "diagonal"}, ["slicefine_mode", "column", "row"]),
        (
            {"peft.type": "full", "tracker.enable_alignment_tracking": "true"},
            ["full fine-tuning", "--enable_alignment_tracking"],
        ),
    ],
)
def test_config_edge_refuses_what_these_methods_cannot_do(overrides, words):
    from perl.config import ConfigError, TrainConfig, apply_overrides, validate

    with pytest.raises(ConfigError) as err:
        validate(apply_overrides(TrainConfig(), overrides))
    for word in words:
        assert word in str(err.value)


def test_lora_run_gradient_scalars_per_component_and_module(tracked_run):
    """The shared LoRA run (conftest): gradient/A/q_proj, gradient/B/... in metrics.jsonl equal the store."""
    grad = _final(tracked_run, "gradient_flow_final.nc")
    records = {
        r["step"]: r
        for r in map(json.loads, (tracked_run / "metrics.jsonl").read_text().splitlines())
        if "gradient/step" in r
    }
    assert sorted(records) == [int(s) for s in grad.step.values] and len(records) >= 2
    for step, record in records.items():
        at = grad.sel(step=step)
        assert record["gradient/total_pre_clip"] == pytest.approx(float(at.total_grad_norm), rel=1e-12)
        assert record["gradient/clip_coef"] == pytest.approx(float(at.clip_coef), rel=1e-12)
        for component in ("A", "B"):
            for module in grad.module.values:
                values = at.grad_norm.sel(component=component, module=module).values
                key = f"gradient/{component}/{module}"
                assert record[key] == pytest.approx(float(np.sqrt(np.nansum(values**2))), rel=1e-12), key


def test_full_spectral_tracker_keeps_w0_once_and_restores_it_on_resume(tmp_path):
    """Full fine-tuning without the CLI: top-k of W_t - W_0 per target module; W_0 survives a resume."""
    from perl.models.loading import load_model
    from perl.trackers import SpectralTracker

    targets = {"q_proj": "self_attn", "down_proj": "mlp"}
    model = load_model("countdown-nano")
    originals = {n: p.detach().clone().double() for n, p in model.named_parameters()}
    weights = {
        (layer, module): getattr(getattr(model.model.layers[layer], block), module).weight
        for layer in range(4)
        for module, block in targets.items()
    }

    def move(scale, seed):
        # a decaying spectrum (as learning makes), plus a little noise
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for w in weights.values():
                u = torch.randn(w.shape[0], 4, generator=gen)
                v = torch.randn(4, w.shape[1], generator=gen)
                w.add_(
                    scale * (u * torch.tensor([1.0, 0.5, 0.25, 0.1])) @ v + 1e-6 * torch.randn(w.shape, generator=gen)
                )

    tracker = SpectralTracker(
        model,
        log_frequency=1,
        save_dir=tmp_path,
        target_modules=list(targets),
        full_top_k=6,
        is_world_process_zero=True,
    )
    assert tracker.modules == list(targets) and tracker.peft_type == "full"
    # W_0 is kept once: exactly the targeted weights
    assert sum(t.numel() for d in tracker._init.values() for t in d.values()) == sum(
        w.numel() for w in weights.values()
    )
    tracker.log_step(0)
    move(1e-3, 0)
    tracker.log_step(1)
    tracker.save_init_state(tmp_path / "checkpoint-1")
    # a resumed process builds its tracker from the moved weights; the checkpoint gives back the true W_0
    resumed = SpectralTracker(
        model,
        log_frequency=1,
        save_dir=tmp_path,
        target_modules=list(targets),
        full_top_k=6,
        is_world_process_zero=True,
    )
    resumed.resume(1, tmp_path / "checkpoint-1")
    move(1e-3, 1)
    resumed.log_step(2)
    ds = resumed.data
    assert ds.attrs["full_finetuning_top_k"] == 6 and [int(s) for s in ds.step.values] == [0, 1, 2]
    for (layer, module), w in weights.items():
        name = f"model.layers.{layer}.{targets[module]}.{module}.weight"
        want = torch.linalg.svdvals(w.detach().double() - originals[name])[:6].numpy()
        got = ds.update_singular_values.sel(step=2, layer=layer, module=module).values
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * want[0])
        assert float(ds.numerical_rank.sel(step=2, layer=layer, module=module)) == 6

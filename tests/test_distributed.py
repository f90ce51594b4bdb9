"""Tracking under DDP, DeepSpeed ZeRO-2, ZeRO-3 and FSDP2 with 2 CPU processes records what one process records.

DDP, ZeRO-2 and ZeRO-3: ``accelerate launch --config_file configs/accelerate/cpu_<engine>.yaml
run.py ...``, a 3-step GRPO run on the shipped countdown-nano with all three trackers at
frequency 1 and ``max_grad_norm`` small enough to clip every step. FSDP2 (accelerate enables it
only on GPU machines): ``torchrun`` runs tests/fsdp2_driver.py, which shards the model with
``fully_shard`` and drives the same trackers through the Trainer's optimizer-step sequence.
One run per engine, shared by the assertions (module-scoped cache). Resume under ZeRO-2 and
ZeRO-3: 2 steps with a checkpoint, then resumed to 4 in the same folder.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from engines import ROOT, accelerate_launch, free_port

STEPS = 3
CLIP = 0.01  # note: far below countdown-nano's gradient norms (~0.2), so every step is clipped
RUN_ARGS = [
    "--enable_tracking",
    "--enable_alignment_tracking",
    "--tracking_frequency",
    "1",
    "--config.tracker.alignment_log_frequency",
    "1",
    "--config.model.model_name_or_path",
    "countdown-nano",
    "--config.training.max_steps",
    str(STEPS),
    "--config.training.max_grad_norm",
    str(CLIP),
    "--config.training.num_generations",
    "8",
    "--config.training.per_device_train_batch_size",
    "8",
    "--config.dataset.example_numbers",
    "32",
    "--config.dataset.test_size",
    "4",
]
ENGINES = ["ddp", "ds_zero2", "ds_zero3"]

pytestmark = pytest.mark.distributed


def _run(cmd: list[str], cwd: Path) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=cwd)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr[-6000:]}"


def _launch(engine: str, out: Path, extra: tuple[str, ...] = ()) -> Path:
    if engine == "single":
        cmd = [sys.executable, str(ROOT / "run.py")]
    elif engine == "fsdp2":
        torchrun = Path(sys.executable).with_name("torchrun")
        _run(
            [
                str(torchrun),
                "--nproc_per_node",
                "2",
                "--master_port",
                str(free_port()),
                str(ROOT / "tests" / "fsdp2_driver.py"),
                str(out),
                str(STEPS),
                str(CLIP),
                *extra,
            ],
            out.parent,
        )
        return out
    elif engine == "fsdp2_single":
        driver = [sys.executable, str(ROOT / "tests" / "fsdp2_driver.py"), str(out), str(STEPS), str(CLIP), *extra]
        _run(driver, out.parent)
        return out
    else:
        cmd = accelerate_launch(engine)
    _run(cmd + RUN_ARGS + ["--config.training.output_dir", str(out), *extra], out.parent)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``runs(engine)``: the run folder of that engine's run, launched on first use."""
    done: dict[str, Path] = {}
    base = tmp_path_factory.mktemp("engines")

    def get(engine: str) -> Path:
        if engine not in done:
            done[engine] = _launch(engine, base / engine)
        return done[engine]

    return get


def _open(out: Path, alignment: bool = True):
    from perl.trackers import RunStore

    names = ("spectral_history_final.nc", "gradient_flow_final.nc") + (("alignment_final.nc",) if alignment else ())
    return tuple(RunStore.open(out / name) for name in names)


def _reference(engine: str) -> str:
    return "fsdp2_single" if engine == "fsdp2" else "single"


# ------------------------------------------------------------------------------------------ stores
@pytest.mark.parametrize("engine", ENGINES + ["fsdp2"])
def test_every_step_is_stored_once_with_the_single_process_coordinates(runs, engine):
    spectral, gradients, alignment = _open(runs(engine))
    assert [int(s) for s in spectral.step.values] == list(range(STEPS + 1))
    assert [int(s) for s in alignment.step.values] == list(range(STEPS + 1))
    assert [int(s) for s in gradients.step.values] == list(range(1, STEPS + 1)), "one writer: each step once"
    ref_spectral, ref_gradients, ref_alignment = _open(runs(_reference(engine)))
    for ds, ref in ((spectral, ref_spectral), (gradients, ref_gradients), (alignment, ref_alignment)):
        for dim in ref.dims:
            if dim != "step":
                assert list(ds[dim].values) == list(ref[dim].values), dim
    # nothing is empty: the sharded engines record real values, not NaN placeholders
    assert np.isfinite(spectral.singular_values.sel(step=STEPS).values).all()
    assert np.isfinite(alignment.energy_fraction_top_left.sel(step=STEPS).values).all()
    assert (gradients.numel.values > 0).sum() == (ref_gradients.numel.values > 0).sum()
    np.testing.assert_array_equal(gradients.numel.values, ref_gradients.numel.values)


@pytest.mark.parametrize("engine", ENGINES + ["fsdp2"])
def test_final_singular_values_equal_a_dense_svd_of_the_saved_adapter(runs, engine):
    from safetensors.numpy import load_file

    out = runs(engine)
    spectral = _open(out)[0]
    weights = load_file(str(out / "adapter_model.safetensors"))
    config = json.loads((out / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    checked = 0
    for key, B in weights.items():
        if "lora_B" not in key:
            continue
        A = weights[key.replace("lora_B", "lora_A")]
        path = key.split(".lora_B")[0]
        layer = int(path.split(".layers.")[1].split(".")[0])
        module = path.rsplit(".", 1)[1]
        dense = np.linalg.svd(scale * B.astype(np.float64) @ A.astype(np.float64), compute_uv=False)[: A.shape[0]]
        stored = spectral.singular_values.sel(step=STEPS, layer=layer, module=module).values[: dense.size]
        np.testing.assert_allclose(stored, dense, rtol=0, atol=1e-5 * dense[0], err_msg=f"{engine} {path}")
        checked += 1
    assert checked == spectral.sizes["layer"] * spectral.sizes["module"]


# --------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("engine", ENGINES + ["fsdp2"])
def test_gradient_norms_are_pre_clip_and_add_up_to_the_engines_total(runs, engine):
    out = runs(engine)
    gradients = _open(out)[1]
    if engine == "fsdp2":
        logged = dict(zip(range(1, STEPS + 1), json.loads((out / "driver.json").read_text())["clip_totals"]))
        assert json.loads((out / "driver.json").read_text())["dtensor_parameters"] > 0, "the model was sharded"
    else:
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        with_norm = [r for r in records if "grad_norm" in r]
        assert [r["step"] for r in with_norm] == list(range(1, STEPS + 1)), "metrics written by rank 0 only"
        logged = {r["step"]: r["grad_norm"] for r in with_norm}
    for step in range(1, STEPS + 1):
        g = gradients.sel(step=step)
        per_tensor = g.grad_norm.values
        total = float(g.total_grad_norm)
        assert np.sqrt(np.nansum(per_tensor**2)) == pytest.approx(total, rel=1e-4), f"{engine} step {step}"
        assert total == pytest.approx(logged[step], rel=1e-5), "the Trainer's (engine's) logged pre-clip norm"
        assert total > CLIP and float(g.clip_coef) < 1.0, "clipped, so the stored norms are the pre-clip ones"
        assert float(g.post_clip_grad_norm) == pytest.approx(CLIP, rel=1e-3)
        assert np.isfinite(g.update_ratio.sel(component="A").values).all()


def test_ddp_and_zero2_see_the_same_step_one_gradient(runs):
    # the same seed, data and global batch of 2 x 8 completions, the same math: only the engine differs
    ddp, zero2 = _open(runs("ddp"))[1], _open(runs("ds_zero2"))[1]
    np.testing.assert_allclose(zero2.grad_norm.sel(step=1).values, ddp.grad_norm.sel(step=1).values, rtol=1e-3)
    assert float(zero2.total_grad_norm.sel(step=1)) == pytest.approx(float(ddp.total_grad_norm.sel(step=1)), rel=1e-3)


def test_fsdp2_gradients_equal_the_unsharded_ones(runs):
    # every rank trains on the same batch, so FSDP2's averaged gradient is the one-process gradient
    sharded, single = _open(runs("fsdp2"))[1], _open(runs("fsdp2_single"))[1]
    np.testing.assert_allclose(sharded.grad_norm.values, single.grad_norm.values, rtol=1e-4)
    np.testing.assert_allclose(
        sharded.update_ratio.sel(component="A").values, single.update_ratio.sel(component="A").values, rtol=1e-3
    )


@pytest.mark.parametrize("method", ["hra", "miss:bat", "slicefine", "full"])
def test_fsdp2_hra_slicefine_and_full_equal_the_unsharded_run(method, tmp_path):
    """HRA's and MiSS-bat's change is read through W0 (gathered with their factors under FSDP2), SliceFine's
    through its trainable slice (a DTensor) and its own copy of W0's slice, full fine-tuning's
    through the whole sharded weight against its gathered initial copy: the sharded run stores what
    the one-process run stores. (Full fine-tuning and MiSS-bat have no alignment store: their changes
    are not low-rank products.)"""
    sharded = _launch("fsdp2", tmp_path / "sharded", (method,))
    single = _launch("fsdp2_single", tmp_path / "single", (method,))
    assert json.loads((sharded / "driver.json").read_text())["dtensor_parameters"] > 0
    aligned = method not in ("full", "miss:bat")  # note: neither has low-rank factors to align
    stores = _open(sharded, alignment=aligned), _open(single, alignment=aligned)
    for ds, ref in zip(*stores):
        assert ds.attrs["peft_type"] == method.partition(":")[0] and list(ds.step.values) == list(ref.step.values)
    (spectral, gradients, *alignment), (ref, ref_gradients, *ref_alignment) = stores
    for name in ("singular_values", "update_singular_values"):
        top = float(np.nanmax(ref[name].values))
        assert top > 0 and np.isfinite(spectral[name].sel(step=STEPS).values[..., 0]).all()
        np.testing.assert_allclose(spectral[name].values, ref[name].values, rtol=0, atol=1e-4 * top, err_msg=name)
    np.testing.assert_allclose(gradients.grad_norm.values, ref_gradients.grad_norm.values, rtol=1e-4)
    for ds, ref in zip(alignment, ref_alignment):
        for name in ("energy_fraction_top_left", "intruder_dimensions"):
            np.testing.assert_allclose(ds[name].values, ref[name].values, rtol=0, atol=1e-4, err_msg=name)


# ------------------------------------------------------------------------------------------ resume
@pytest.mark.parametrize("engine", ["ds_zero2", "ds_zero3"])
def test_resume_under_deepspeed_continues_every_store(tmp_path, engine):
    # note: DDP resumes through the same Trainer path as one process (tests/test_resume.py); DeepSpeed
    # restores its own engine checkpoint, and under ZeRO-3 the trackers resume with sharded parameters
    from perl.trackers import RunStore

    out = tmp_path / "resume"

    def launch(steps: int, *extra: str) -> None:
        args = list(RUN_ARGS)
        args[args.index("--config.training.max_steps") + 1] = str(steps)
        cmd = [
            *accelerate_launch(engine),
            *args,
            "--config.training.output_dir",
            str(out),
            "--config.training.save_strategy",
            "steps",
            "--config.training.save_steps",
            "2",
            *extra,
        ]
        _run(cmd, tmp_path)

    launch(2)
    before = RunStore.open(out / "spectral_logs" / "spectral_history.nc")
    from safetensors import safe_open

    with safe_open(str(out / "checkpoint-2" / "tracker_init.safetensors"), framework="pt") as f:
        assert {"spectral", "alignment"} <= set(f.metadata()), "one initial-state file for both trackers"
    assert not list((out / "checkpoint-2").glob("*_tracker_init.safetensors"))
    launch(4, "--config.training.resume_from_checkpoint", "true")
    spectral, gradients, alignment = _open(out)
    assert [int(s) for s in spectral.step.values] == [0, 1, 2, 3, 4]
    assert [int(s) for s in alignment.step.values] == [0, 1, 2, 3, 4]
    assert [int(s) for s in gradients.step.values] == [1, 2, 3, 4]
    np.testing.assert_array_equal(
        spectral.singular_values.sel(step=[0, 1, 2]).values, before.singular_values.sel(step=[0, 1, 2]).values
    )
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "grad_norm" in r] == [1, 2, 3, 4]
    for step in (3, 4):
        g = gradients.sel(step=step)
        assert np.sqrt(np.nansum(g.grad_norm.values**2)) == pytest.approx(float(g.total_grad_norm), rel=1e-4)

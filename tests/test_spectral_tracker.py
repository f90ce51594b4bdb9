"""SpectralTracker on a tiny Qwen2 for all fifteen PEFT methods, against independent dense SVDs.

Each method is built through the adapter registry (the code path of training), trained for a few
manual optimizer steps on a random-token loss, logged, and the stored values are compared with
``torch.linalg.svdvals`` of the module's dense delta weight from peft's own ``get_delta_weight``.
"""

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from perl.trackers import RunStore, SpectralTracker, SpectralTrackingCallback
from perl.trackers.discovery import discover_adapters

registry = pytest.importorskip("perl.adapters.registry")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = registry.PEFT_METHODS
assert len(METHODS) == 15
STEPS = 3
REL = 1e-5


def tiny_model(layers=2, seed=0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return Qwen2ForCausalLM(config)


def build(method, layers=2, r=4, miss_init="balance"):
    cfg = SimpleNamespace(
        type=method,
        r=r,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=TARGETS,
        init_r=6,
        target_r=3,
        miss_init=miss_init,
    )
    return registry.build_adapter(tiny_model(layers), cfg, total_steps=STEPS).model


def train_steps(model, n, start=0, seed=0):
    """n AdamW steps on a random-token LM loss; AdaLoRA allocates after backward, before zero_grad."""
    from perl.adapters.adalora import allocate, find_adalora_model

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-2)
    gen = torch.Generator().manual_seed(seed)
    ada = find_adalora_model(model)
    for step in range(start, start + n):
        x = torch.randint(0, 96, (2, 12), generator=gen)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        if ada is not None:
            allocate(ada, step)
        opt.zero_grad()


def dense_delta(am):
    m, ad = am.peft_module, am.adapter
    if am.kind == "miss":
        w0 = m.get_base_layer().weight.detach()
        if m.miss_fn == "bat":
            return m.get_delta_weight(ad, w0.clone())
        return m.get_delta_weight_miss(ad, w0.clone()) - w0
    if am.kind == "hra":
        # peft's HRA "delta" is the rotation H (in x in), the effective weight W0 @ H; in float64
        w0 = m.get_base_layer().weight.detach().double()
        u = m.hra_u[ad].detach().double()
        u = u / u.norm(dim=0)
        h = torch.eye(u.shape[0], dtype=torch.float64)
        for i in range(u.shape[1]):
            h = h - 2 * h @ u[:, i : i + 1] @ u[:, i : i + 1].T
        return w0 @ h - w0
    return m.get_delta_weight(ad)


def test_miss_bat_change_is_the_one_peft_merges():
    # the tracker computes MiSS-bat's change itself (peft's code cannot read a sharded block)
    model = build("miss", miss_init="bat")
    train_steps(model, 2)
    adapters = discover_adapters(model)
    assert adapters and all(a.peft_module.miss_fn == "bat" for a in adapters)
    for a in adapters:
        with torch.no_grad():
            ours, peft_s = a.dense_delta(), dense_delta(a)
        assert float(peft_s.abs().max()) > 0, a.name
        np.testing.assert_allclose(ours.numpy(), peft_s.numpy(), rtol=0, atol=1e-6 * float(peft_s.abs().max()))


def close(stored, reference, scale):
    return np.max(np.abs(stored - reference)) <= REL * max(scale, 1e-30)


@pytest.mark.parametrize("method", METHODS)
def test_stored_spectra_equal_dense_svd_of_peft_delta(method, tmp_path):
    model = build(method)
    tracker = SpectralTracker(model, log_frequency=1, save_dir=tmp_path, peft_type=method)
    adapters = discover_adapters(model)
    with torch.no_grad():
        init_delta = {a.name: dense_delta(a).double().clone() for a in adapters if a.kind not in ("ia3", "ln_tuning")}
        init_vec = {
            a.name: torch.cat([p.detach().reshape(-1).double().clone() for ps in a.components.values() for p in ps])
            for a in adapters
            if a.kind in ("ia3", "ln_tuning")
        }
    tracker.log_step(0)
    train_steps(model, STEPS)
    tracker.log_step(STEPS)
    ds = RunStore.open(tmp_path / "spectral_logs" / "spectral_history.nc")
    assert list(ds.step.values) == [0, STEPS]
    assert ds.attrs["peft_type"] == method and ds.attrs["Conventions"] == "CF-1.8"

    for a in adapters:
        cell = dict(layer=a.layer, module=a.module)
        if a.kind in ("ia3", "ln_tuning"):
            v = torch.cat([p.detach().reshape(-1).double() for ps in a.components.values() for p in ps])
            assert math.isclose(
                float(ds.vector_norm.sel(step=STEPS, **cell)), float(v.norm()), rel_tol=1e-6
            )  # stored as float32
            moved = float((v - init_vec[a.name]).norm())
            assert moved > 0
            assert math.isclose(float(ds.vector_distance_from_init.sel(step=STEPS, **cell)), moved, rel_tol=1e-6)
            assert float(ds.vector_distance_from_init.sel(step=0, **cell)) == 0.0
            continue
        with torch.no_grad():
            delta = dense_delta(a).double()
        want = torch.linalg.svdvals(delta).numpy()
        stored = ds.singular_values.sel(step=STEPS, **cell).values
        n = int(np.sum(~np.isnan(stored)))
        assert n == min(ds.sizes["sv"], *delta.shape) and n >= 1
        assert close(stored[:n], want[:n], want[0]), (a.name, stored[:n], want[:n])
        # update since init, against the dense difference of peft's deltas
        want_up = torch.linalg.svdvals(delta - init_delta[a.name]).numpy()
        up = ds.update_singular_values.sel(step=STEPS, **cell).values
        n_up = int(np.sum(~np.isnan(up)))
        assert n_up >= n and close(up[:n_up], want_up[:n_up], want_up[0]), (a.name, up, want_up[:n_up])
        # step 0: the update since init is exactly zero for every method (PiSSA / MiLoRA included)
        assert np.nansum(np.abs(ds.update_singular_values.sel(step=0, **cell).values)) == 0.0
        assert float(ds.update_frobenius_norm.sel(step=0, **cell)) == 0.0
        # defined metrics are finite after training
        for name in (
            "effective_rank",
            "entropy_effective_rank",
            "stable_rank",
            "condition_number",
            "top1_sv_ratio",
            "numerical_rank",
            "update_effective_rank",
            "update_condition_number",
        ):
            assert np.isfinite(float(ds[name].sel(step=STEPS, **cell))), (a.name, name)
    if method in ("pissa", "milora"):
        # the product starts nonzero; what learning did is the (different) update since init
        assert float(ds.frobenius_norm.sel(step=0).max()) > 0
        assert float(ds.update_frobenius_norm.sel(step=STEPS).max()) < float(ds.frobenius_norm.sel(step=STEPS).max())
    if method == "dora":
        check_dora(ds, adapters)
    if method == "adalora":
        check_adalora(ds, adapters, model)
    if method in (
        "lora",
        "dora",
        "rslora",
        "lora_plus",
        "lorafa",
        "milora_plus",
        "adalora",
        "miss",
        "hra",
        "slicefine",
    ):
        # B_0 A_0 = 0: the zero product at step 0 has defined metrics (documented), not 1e10
        assert float(ds.frobenius_norm.sel(step=0).max()) == 0.0
        assert float(ds.effective_rank.sel(step=0).max()) == 0.0
        assert np.isnan(ds.condition_number.sel(step=0).values).all()


def check_dora(ds, adapters):
    for a in adapters:
        cell = dict(layer=a.layer, module=a.module)
        m = a.peft_module
        with torch.no_grad():
            w0 = m.get_base_layer().weight.double()
            direction = w0 + m.get_delta_weight(a.adapter).double()
            mag = m.lora_magnitude_vector[a.adapter].weight.double()
            effective = (mag / torch.linalg.norm(direction, dim=1)).unsqueeze(1) * direction
        assert math.isclose(
            float(ds.magnitude_norm.sel(step=STEPS, **cell)), float(mag.norm()), rel_tol=1e-6
        )  # stored as float32
        assert math.isclose(float(ds.direction_norm.sel(step=STEPS, **cell)), float(direction.norm()), rel_tol=1e-5)
        assert float(ds.magnitude_direction_ratio.sel(step=0, **cell)) == pytest.approx(1.0, abs=1e-6)
        want = torch.linalg.svdvals(effective - w0).numpy()
        stored = ds.dora_update_singular_values.sel(step=STEPS, **cell).values
        assert close(stored, want[: stored.size], want[0]), (a.name, stored, want[:4])
        assert np.all(ds.dora_update_singular_values.sel(step=0, **cell).values == 0)


def check_adalora(ds, adapters, model):
    allocator = model.base_model.rankallocator
    assert model.peft_config["default"].rank_pattern is not None  # the budget was allocated
    budgets = []
    for a in adapters:
        cell = dict(layer=a.layer, module=a.module)
        kept = int(torch.count_nonzero(a.peft_module.lora_E["default"].detach()))
        budget = float(ds.rank_budget.sel(step=STEPS, **cell))
        assert budget == kept, (a.name, budget, kept)
        budgets.append(budget)
        assert float(ds.rank_budget.sel(step=0, **cell)) == a.rank
        # importance: peft's formula, computed here from the allocator by parameter name
        scores = {}
        for n, _ in model.named_parameters():
            if a.name in n and n.endswith(".default"):
                part = n.split(".")[-2]
                if part not in ("lora_A", "lora_B", "lora_E"):
                    continue
                key = next(k for k in allocator.exp_avg_ipt if n.endswith(k))
                scores[part] = allocator.exp_avg_ipt[key] * allocator.exp_avg_unc[key]
        want = scores["lora_E"].reshape(-1) + scores["lora_A"].mean(1) + scores["lora_B"].mean(0)
        stored = ds.importance_scores.sel(step=STEPS, **cell).values[: want.numel()]
        np.testing.assert_allclose(stored, want.double().numpy(), rtol=1e-6)
    assert min(budgets) < ds.sizes["sv"]  # the budget moved


def test_analysis_api_summary_final_file_and_attrs(tmp_path):
    model = build("lora", layers=3)
    tracker = SpectralTracker(
        model,
        log_frequency=2,
        save_dir=tmp_path,
        max_layers_to_track=2,
        run_attrs={"seed": 7, "config_yaml": "peft:\n  type: lora\n"},
    )
    assert tracker.layers == [0, 2]  # first and last block
    tracker.log_step(0)
    train_steps(model, 2)
    tracker.log_step(2)
    assert tracker.log_step(2) is None  # a stored step is not logged twice
    final = tracker.save()
    assert final == tmp_path / "spectral_history_final.nc"

    summary = json.loads((tmp_path / "spectral_logs" / "spectral_history_summary.json").read_text())
    assert summary["steps"] == [0, 2] and summary["peft_type"] == "lora"
    assert summary["metrics"]["effective_rank"]["last"]["max"] <= 4
    assert summary["metrics"]["condition_number"]["first"] == {"step": 0}  # NaN at step 0: no numbers

    loaded = SpectralTracker.load(tmp_path)
    ds = loaded.data
    assert ds.attrs["seed"] == 7 and ds.attrs["r"] == 4 and ds.attrs["lora_alpha"] == 8
    assert ds.attrs["scaling"] == 2.0 and "q_proj" in list(ds.attrs["target_modules"])
    for name, var in ds.data_vars.items():
        assert var.attrs.get("long_name") and "units" in var.attrs, name
    history = loaded.get_layer_history("model.layers.2.self_attn.q_proj")
    assert list(history.step.values) == [0, 2] and history.singular_values.dims == ("step", "sv")
    across = loaded.get_metric_across_layers("effective_rank", step_idx=-1)
    assert across.dims == ("layer", "module")
    assert float(across.sel(layer=2, module="q_proj")) == float(history.effective_rank.isel(step=-1))
    with pytest.raises(KeyError, match="Unknown metric"):
        loaded.get_metric_across_layers("nonsense")
    with pytest.raises(KeyError, match="No tracked module"):
        loaded.get_layer_history("model.layers.1.self_attn.q_proj")
    assert SpectralTracker.load(tmp_path / "spectral_logs" / "spectral_history.nc").data.sizes == ds.sizes


def test_top_k_mode_and_non_writing_rank(tmp_path):
    model = build("lora")
    tracker = SpectralTracker(model, save_dir=tmp_path, compute_full_svd=False, top_k=2)
    train_steps(model, 1)
    ds = tracker.log_step(1)
    full = torch.linalg.svdvals(
        model.base_model.model.model.layers[0].self_attn.q_proj.get_delta_weight("default").detach().double()
    )
    np.testing.assert_allclose(
        ds.singular_values.sel(step=1, layer=0, module="q_proj").values, full[:2].numpy(), rtol=1e-6
    )
    assert ds.sizes["sv"] == 2 and ds.sizes["sv_update"] == 2
    other = SpectralTracker(model, save_dir=tmp_path / "rank1", is_world_process_zero=False)
    assert other.log_step(1) is None and other.save() is None
    assert not (tmp_path / "rank1").exists()


def test_nan_weights_are_stored_as_nan_and_logging_goes_on(tmp_path):
    model = build("lora")
    tracker = SpectralTracker(model, save_dir=tmp_path)
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        q.lora_B["default"].weight.fill_(float("nan"))
    ds = tracker.log_step(1)
    assert np.isnan(ds.singular_values.sel(layer=0, module="q_proj").values).all()
    assert np.isnan(ds.effective_rank.sel(layer=0, module="q_proj").values).all()
    assert np.isfinite(ds.effective_rank.sel(layer=1, module="q_proj").values).all()


# ------------------------------------------------------------------ Trainer integration
def _trainer(model, out, max_steps, callbacks, save_steps=2):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 96, (16, 12), generator=gen).tolist()
    data = Dataset.from_dict({"input_ids": ids, "labels": ids})
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=max_steps,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        logging_steps=1,
        save_steps=save_steps,
        save_strategy="steps",
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        save_only_model=False,
    )
    return Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks)


def test_callback_steps_logs_checkpoints_and_resume(tmp_path):
    model = build("pissa")
    tracker = SpectralTracker(model, log_frequency=2, save_dir=tmp_path)
    trainer = _trainer(model, tmp_path, max_steps=5, callbacks=[SpectralTrackingCallback(tracker)])
    trainer.train()
    first = RunStore.open(tmp_path / "spectral_history_final.nc")
    assert list(first.step.values) == [0, 2, 4, 5]  # step 0, every 2 optimizer steps, the end
    logged = [h for h in trainer.state.log_history if "spectral/step" in h]
    assert [h["spectral/step"] for h in logged] == [0.0, 2.0, 4.0]  # step 0 rides on the first log record
    assert any(
        "spectral/effective_rank/q_proj" in h and "spectral/condition_number/max" in h
        for h in trainer.state.log_history
    )
    assert (tmp_path / "checkpoint-4" / "tracker_init.safetensors").is_file()

    # resume from checkpoint-4 in a fresh process state: a new model whose init differs
    model2 = build("pissa")
    with torch.no_grad():
        for p in model2.parameters():
            if p.requires_grad:
                p.add_(0.5)  # tracker-creation weights != the original init: only the checkpoint can restore B_0
    tracker2 = SpectralTracker(model2, log_frequency=2, save_dir=tmp_path)
    trainer2 = _trainer(model2, tmp_path, max_steps=5, callbacks=[SpectralTrackingCallback(tracker2)])
    trainer2.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    resumed = RunStore.open(tmp_path / "spectral_history_final.nc")
    assert list(resumed.step.values) == [0, 2, 4, 5]  # no duplicates, nothing missing
    for name in ("singular_values", "update_singular_values"):
        np.testing.assert_allclose(resumed[name].sel(step=4).values, first[name].sel(step=4).values)
        np.testing.assert_allclose(
            resumed[name].sel(step=5).values, first[name].sel(step=5).values, rtol=1e-4, atol=1e-6
        )


KILLED = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    from test_spectral_tracker import build, train_steps
    from perl.trackers import SpectralTracker
    model = build("lora")
    tracker = SpectralTracker(model, log_frequency=1, save_dir={out!r})
    tracker.log_step(0)
    for step in range(1, 100000):
        train_steps(model, 1, start=step - 1, seed=step)
        tracker.log_step(step)
        print(step, flush=True)
""")


def test_sigkill_of_a_tracked_training_leaves_a_readable_store(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(KILLED.format(tests=os.path.dirname(__file__), out=str(tmp_path / "run")))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while True:  # note: libraries may log to stdout on import (DeepSpeed's accelerator notice): wait for step 3
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        if line.strip() == "3":
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    loaded = SpectralTracker.load(tmp_path / "run")
    steps = [int(s) for s in loaded.data.step.values]
    assert steps[:4] == [0, 1, 2, 3] and steps == list(range(len(steps)))
    assert np.isfinite(loaded.data.effective_rank.sel(step=3).values).all()

"""Gradient flow tracker: stored norms against independent computations, Trainer semantics, heatmaps.

Every expected value here is computed by hand (a second backward pass, torch.linalg.norm over
named parameters, a parameter copy), mapped to its (layer, module, component) cell by parameter
name patterns written in this file, not by the tracker's discovery code.
"""

from __future__ import annotations

import copy
import logging
import math
import re

import numpy as np
import peft
import pytest
import torch
import torch.nn.functional as F
import xarray as xr
from torch.utils.data import Dataset
from transformers import Qwen2Config, Qwen2ForCausalLM, Trainer, TrainingArguments

from perl.trackers.callbacks import GradientFlowCallback
from perl.trackers.discovery import DiscoveryError
from perl.trackers.gradient import GradientFlowTracker
from perl.trackers.heatmaps import gradient_heatmap

VOCAB = 96
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_qwen2(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return Qwen2ForCausalLM(cfg)


def _randomize(model, pattern: str, scale: float = 0.1) -> None:
    # peft zero-inits some tensors (VeRA's lambda_b, MiSS's block): make every gradient non-trivial
    with torch.no_grad():
        for name, p in model.named_parameters():
            if pattern in name:
                p.normal_(0.0, scale)


PEFT_CASES = {
    "lora": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=ALL_LINEAR, init_lora_weights=False),
    "dora": lambda: peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=ALL_LINEAR, use_dora=True, init_lora_weights=False
    ),
    "adalora": lambda: peft.AdaLoraConfig(
        init_r=4, target_r=2, target_modules=ALL_LINEAR, total_step=10, init_lora_weights=False
    ),
    "vera": lambda: peft.VeraConfig(r=4, target_modules=ALL_LINEAR),
    "ia3": lambda: peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "ln_tuning": lambda: peft.LNTuningConfig(target_modules=["input_layernorm", "post_attention_layernorm", "norm"]),
    "miss": lambda: peft.MissConfig(r=4, target_modules=ALL_LINEAR),
}

# parameter-name patterns of each component, written independently of perl.trackers.discovery
COMPONENT_OF = [
    (r"\.lora_magnitude_vector\.", "magnitude"),
    (r"\.lora_A\.", "A"),
    (r"\.lora_B\.", "B"),
    (r"\.lora_E\.", "E"),
    (r"\.vera_lambda_b\.", "lambda_b"),
    (r"\.vera_lambda_d\.", "lambda_d"),
    (r"\.ia3_l\.", "ia3"),
    (r"\.ln_tuning_layers\.", "ln"),
    (r"\.miss_block\.", "miss"),
]


def expected_cell(name: str) -> tuple[int, str, str]:
    component = next(c for pattern, c in COMPONENT_OF if re.search(pattern, name))
    owner = re.split(
        r"\.(?:lora_magnitude_vector|lora_[ABE]|vera_lambda_[bd]|ia3_l|ln_tuning_layers|miss_block)\.", name
    )[0]
    m = re.search(r"\.layers\.(\d+)\.", owner)
    return (int(m.group(1)) if m else -1), owner.split(".")[-1], component


def peft_model(method: str, seed: int = 0):
    model = peft.get_peft_model(tiny_qwen2(seed), PEFT_CASES[method]())
    _randomize(model, "vera_lambda_b")
    _randomize(model, "miss_block")
    return model


def lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


def norms_by_cell(named: list[tuple[str, torch.Tensor]]) -> dict[tuple[int, str, str], float]:
    """sqrt(sum of squared norms) of the tensors that fall in one cell."""
    sq: dict = {}
    for name, t in named:
        cell = expected_cell(name)
        sq[cell] = sq.get(cell, 0.0) + float(torch.linalg.norm(t.detach().double())) ** 2
    return {cell: math.sqrt(v) for cell, v in sq.items()}


def stored(da: xr.DataArray, cell) -> float:
    layer, module, component = cell
    return float(da.sel(layer=layer, module=module, component=component))


# ------------------------------------------------------------------------------ norms, per method
@pytest.mark.parametrize("method", list(PEFT_CASES))
def test_stored_norms_equal_an_independent_backward(method, tmp_path):
    model = peft_model(method)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))

    # by hand: the same batch, the pre-clip gradient of every trainable tensor
    lm_loss(model, ids).backward()
    expected_grad = norms_by_cell([(n, p.grad) for n, p in trainable])
    expected_weight = norms_by_cell([(n, p) for n, p in trainable])
    expected_total = float(torch.linalg.norm(torch.cat([p.grad.reshape(-1) for _, p in trainable]).double()))
    model.zero_grad(set_to_none=True)

    tracker = GradientFlowTracker(model, log_frequency=1, save_dir=tmp_path)
    opt = torch.optim.AdamW([p for _, p in trainable], lr=1e-2)
    lm_loss(model, ids).backward()
    max_norm = 0.1 * expected_total  # make clipping act, so the stored values must undo it
    total = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    before = {n: p.detach().clone() for n, p in trainable}
    tracker.log_step(1, total_grad_norm=total, max_grad_norm=max_norm)
    opt.step()
    tracker.log_update()
    ds = tracker.data.sel(step=1)

    expected_update = norms_by_cell([(n, p.detach() - before[n]) for n, p in trainable])
    assert set(expected_grad) == {
        (int(l), str(m), str(c))
        for l in ds.layer.values
        for m in ds.module.values
        for c in ds.component.values
        if int(ds.numel.sel(layer=l, module=m, component=c)) > 0
    }, "the tracked cells are exactly the trainable adapter tensors"
    for cell in expected_grad:
        assert stored(ds.grad_norm, cell) == pytest.approx(expected_grad[cell], rel=1e-4, abs=1e-12), cell
        assert stored(ds.weight_norm, cell) == pytest.approx(expected_weight[cell], rel=1e-5), cell
        assert stored(ds.update_ratio, cell) == pytest.approx(
            expected_update[cell] / expected_weight[cell], rel=1e-4
        ), cell
        assert stored(ds.grad_to_weight_ratio, cell) == pytest.approx(
            expected_grad[cell] / expected_weight[cell], rel=1e-4
        )
        assert expected_grad[cell] > 0, f"{cell}: the test needs a non-trivial gradient"
    # cells the method does not have are NaN, never 0
    untracked = ds.grad_norm.where(ds.numel == 0)
    assert int((ds.numel == 0).sum()) == 0 or bool(np.isnan(untracked.values[(ds.numel == 0).values]).all())
    assert float(ds.total_grad_norm) == pytest.approx(expected_total, rel=1e-5)
    assert float(ds.clip_coef) == pytest.approx(max_norm / (expected_total + 1e-6), rel=1e-5)
    assert float(ds.post_clip_grad_norm) == pytest.approx(max_norm, rel=1e-4)


def test_lora_at_init_zero_gradient_is_zero_and_zero_weight_gives_inf_ratio(tmp_path):
    model = peft.get_peft_model(tiny_qwen2(), peft.LoraConfig(r=4, target_modules=["q_proj"]))  # B = 0
    tracker = GradientFlowTracker(model, log_frequency=1, save_dir=tmp_path)
    lm_loss(model, torch.randint(0, VOCAB, (2, 10))).backward()
    tracker.log_step(1)
    tracker.save()
    ds = tracker.data.sel(step=1, module="q_proj")
    # dL/dA = s B^T (...) = 0 exactly while B = 0: a defined zero, not NaN, not 1e-10
    assert (ds.grad_norm.sel(component="A").values == 0).all()
    assert (ds.grad_norm.sel(component="B").values > 0).all()
    assert np.isposinf(ds.grad_to_weight_ratio.sel(component="B").values).all()
    assert np.isnan(ds.update_ratio.values).all(), "no optimizer step was observed: update_ratio is missing"
    assert float(tracker.data.clip_coef.sel(step=1)) == 1.0


def test_missing_gradient_is_nan_and_left_out_of_the_total(tmp_path):
    model = peft_model("lora")
    tracker = GradientFlowTracker(model, log_frequency=1, save_dir=tmp_path)
    lm_loss(model, torch.randint(0, VOCAB, (2, 10))).backward()
    dropped = model.base_model.model.model.layers[1].mlp.up_proj.lora_B["default"].weight
    dropped.grad = None
    rest = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    tracker.log_step(1)
    tracker.save()
    ds = tracker.data.sel(step=1)
    assert np.isnan(float(ds.grad_norm.sel(layer=1, module="up_proj", component="B")))
    assert float(ds.grad_norm.sel(layer=1, module="up_proj", component="A")) > 0
    assert float(ds.total_grad_norm) == pytest.approx(
        float(torch.linalg.norm(torch.cat([g.reshape(-1) for g in rest]))), rel=1e-5
    )


def test_nonfinite_total_stores_nan_per_tensor(tmp_path, caplog):
    model = peft_model("lora")
    tracker = GradientFlowTracker(model, log_frequency=1, save_dir=tmp_path)
    lm_loss(model, torch.randint(0, VOCAB, (2, 10))).backward()
    with caplog.at_level(logging.WARNING, logger="perl"):
        tracker.log_step(1, total_grad_norm=torch.tensor(float("inf")), max_grad_norm=1.0)
        tracker.save()
    ds = tracker.data.sel(step=1)
    assert np.isposinf(float(ds.total_grad_norm))
    assert np.isnan(ds.grad_norm.values).all()
    assert "destroyed" in caplog.text


def test_full_fine_tuning_tracks_the_target_modules_weights_like_an_adapter(tmp_path):
    model = tiny_qwen2()
    tracker = GradientFlowTracker(model, log_frequency=1, save_dir=tmp_path, target_modules=["q_proj", "down_proj"])
    lm_loss(model, torch.randint(0, VOCAB, (2, 10))).backward()
    tracker.log_step(1)
    assert tracker.log_update()
    ds = tracker.data.sel(step=1)
    assert [str(c) for c in ds.component.values] == ["weight"]
    assert [str(m) for m in ds.module.values] == ["q_proj", "down_proj"]
    assert [int(l) for l in ds.layer.values] == [0, 1]
    named = dict(model.named_parameters())
    for layer in (0, 1):
        for module, block in (("q_proj", "self_attn"), ("down_proj", "mlp")):
            grad = named[f"model.layers.{layer}.{block}.{module}.weight"].grad
            assert stored(ds.grad_norm, (layer, module, "weight")) == pytest.approx(float(grad.norm()), rel=1e-5)
    # the post-clip total still covers every trainable parameter, tracked or not
    everything = torch.sqrt(sum(p.grad.double().square().sum() for p in model.parameters() if p.grad is not None))
    assert float(ds.post_clip_grad_norm) == pytest.approx(float(everything), rel=1e-5)
    # the Trainer-log scalars: per module, the L2 norm over layers
    q = float(np.sqrt(sum(stored(ds.grad_norm, (l, "q_proj", "weight")) ** 2 for l in (0, 1))))
    assert tracker.last_scalars["gradient/weight/q_proj"] == pytest.approx(q, rel=1e-12)
    assert tracker.last_scalars["gradient/step"] == 1.0
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(DiscoveryError, match="No trainable weight"):
        GradientFlowTracker(model, log_frequency=1, save_dir=tmp_path / "frozen")


def test_full_fine_tuning_tracks_every_weight_under_named_cells(tmp_path):
    model = tiny_qwen2()
    tracker = GradientFlowTracker(model, log_frequency=1, save_dir=tmp_path, track_adapter_only=False)
    lm_loss(model, torch.randint(0, VOCAB, (2, 10))).backward()
    tracker.log_step(1)
    tracker.save()
    ds = tracker.data.sel(step=1)
    named = dict(model.named_parameters())
    cases = {
        (0, "q_proj", "weight"): "model.layers.0.self_attn.q_proj.weight",
        (0, "q_proj", "bias"): "model.layers.0.self_attn.q_proj.bias",
        (1, "down_proj", "weight"): "model.layers.1.mlp.down_proj.weight",
        (1, "input_layernorm", "weight"): "model.layers.1.input_layernorm.weight",
        (-1, "embed_tokens", "weight"): "model.embed_tokens.weight",
        (-1, "norm", "weight"): "model.norm.weight",
        (-1, "lm_head", "weight"): "lm_head.weight",
    }
    for cell, name in cases.items():
        assert stored(ds.grad_norm, cell) == pytest.approx(float(torch.linalg.norm(named[name].grad)), rel=1e-5), cell
    assert int(ds.numel.sum()) == sum(p.numel() for p in model.parameters())
    assert np.isnan(float(ds.grad_norm.sel(layer=-1, module="q_proj", component="weight")))


def test_adapter_plus_other_trainable_parameters(tmp_path):
    config = peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"], init_lora_weights=False)
    model = peft.get_peft_model(tiny_qwen2(), config)
    tracker = GradientFlowTracker(model, log_frequency=1, save_dir=tmp_path, track_adapter_only=False)
    lm_loss(model, torch.randint(0, VOCAB, (2, 10))).backward()
    tracker.log_step(1)
    tracker.save()
    ds = tracker.data.sel(step=1)
    head = model.base_model.model.lm_head.modules_to_save["default"].weight
    assert stored(ds.grad_norm, (-1, "lm_head", "weight")) == pytest.approx(
        float(torch.linalg.norm(head.grad)), rel=1e-5
    )
    assert {str(c) for c in ds.component.values} == {"A", "B", "weight"}
    assert int(ds.numel.sum()) == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_resume_drops_later_steps_and_load_reads_back(tmp_path):
    model = peft_model("dora")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(0, VOCAB, (2, 10))

    def run(tracker, steps):
        for s in steps:
            lm_loss(model, ids).backward()
            if tracker.should_log(s):
                tracker.log_step(s)
            opt.step()
            tracker.log_update()
            opt.zero_grad()

    tracker = GradientFlowTracker(model, log_frequency=2, save_dir=tmp_path)
    run(tracker, range(1, 7))
    assert tracker.store.steps == [2, 4, 6]
    resumed = GradientFlowTracker(model, log_frequency=2, save_dir=tmp_path)
    resumed.resume_from(4)
    run(resumed, range(5, 9))
    assert resumed.finalize() == tmp_path / "gradient_flow_final.nc"

    loaded = GradientFlowTracker.load(tmp_path)
    assert [int(s) for s in loaded.data.step.values] == [2, 4, 6, 8]
    matrix = loaded.get_gradient_matrix("magnitude")
    assert matrix.dims == ("layer", "step")
    by_hand = np.sqrt((loaded.data.grad_norm.sel(component="magnitude") ** 2).sum("module"))
    np.testing.assert_allclose(matrix.values, by_hand.transpose("layer", "step").values)
    assert loaded.get_layer_history(1).grad_norm.dims == ("step", "module", "component")
    with pytest.raises(ValueError, match="recorded components"):
        loaded.get_gradient_matrix("E")
    with pytest.raises(ValueError, match="tracked layers"):
        loaded.get_layer_history(7)
    for name in (
        "gradient_heatmap_A.png",
        "gradient_heatmap_B.png",
        "gradient_heatmap_magnitude.png",
        "gradient_layer_comparison.png",
        "gradient_flow_summary.json",
    ):
        assert (tmp_path / "gradient_logs" / name).stat().st_size > 0, name

    # a new run in the same folder starts from an empty store, without the old run's outputs
    fresh = GradientFlowTracker(model, log_frequency=2, save_dir=tmp_path)
    fresh.start_fresh()
    assert fresh.store.steps == [] and not (tmp_path / "gradient_flow_final.nc").exists()
    assert not list((tmp_path / "gradient_logs").glob("*"))


# ------------------------------------------------------------------------------ heatmap rendering
def _pixel(fig, ax, x: float, y: float) -> np.ndarray:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    image = np.asarray(canvas.buffer_rgba())
    px, py = ax.transData.transform((x, y))
    return image[image.shape[0] - int(round(py)), int(round(px)), :3]


def test_heatmap_leaves_nan_blank_and_marks_zero(tmp_path):
    values = np.array([[1e-3, np.nan, 1e-1], [0.0, 1e-2, 1.0]])  # (layer, step)
    matrix = xr.DataArray(values, dims=("layer", "step"), coords={"layer": [0, 1], "step": [10, 20, 30]})
    fig = gradient_heatmap(matrix, title="test")
    ax = fig.axes[0]
    mesh = ax.collections[0]
    assert bool(np.ma.getmaskarray(mesh.get_array()).reshape(2, 3)[0, 1])
    assert not np.ma.getmaskarray(mesh.get_array()).reshape(2, 3)[1, 0], "a zero is data, not missing"
    white = np.array([255, 255, 255])
    np.testing.assert_array_equal(_pixel(fig, ax, 1.5, 0.5), white)  # NaN: blank
    assert not np.array_equal(_pixel(fig, ax, 0.5, 1.5), white)  # zero: grey
    assert not np.array_equal(_pixel(fig, ax, 2.5, 1.5), white)  # a value: coloured
    zero = _pixel(fig, ax, 0.5, 1.5).astype(int)
    assert abs(zero[0] - zero[1]) < 3 and abs(zero[1] - zero[2]) < 3, "zero is drawn grey"
    assert ax.get_xlabel() and ax.get_ylabel() and fig.axes[1].get_ylabel()  # axes and colour bar labelled


# ------------------------------------------------------------------------------ with the Trainer
class TokenRows(Dataset):
    def __init__(self, rows: torch.Tensor):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i]}


class LMTrainer(Trainer):
    """Next-token cross-entropy from input_ids (no labels: the Trainer divides by the accumulation steps)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = lm_loss(model, inputs["input_ids"])
        return (loss, None) if return_outputs else loss


def _train(model, tmp_path, rows, log_frequency=1, **args):
    tracker = GradientFlowTracker(model, log_frequency=log_frequency, save_dir=tmp_path / "track")
    callback = GradientFlowCallback(tracker)
    targs = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        learning_rate=1e-3,
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        **args,
    )
    trainer = LMTrainer(model=model, args=targs, train_dataset=TokenRows(rows), callbacks=[callback])
    callback.bind_trainer(trainer)
    trainer.train()
    return tracker, trainer


def test_trainer_clip_stores_pre_clip_total_equal_to_the_logged_grad_norm(tmp_path):
    model = peft_model("lora")
    rows = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    initial = copy.deepcopy(model)
    lm_loss(initial, rows).backward()
    expected_step1 = norms_by_cell([(n, p.grad) for n, p in initial.named_parameters() if p.requires_grad])

    tracker, trainer = _train(model, tmp_path, rows, max_steps=3, per_device_train_batch_size=2, max_grad_norm=1e-3)
    ds = GradientFlowTracker.load(tmp_path / "track").data
    logged = {h["step"]: h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h}
    assert [int(s) for s in ds.step.values] == sorted(logged) == [1, 2, 3]
    for step, value in logged.items():
        total = float(ds.total_grad_norm.sel(step=step))
        assert total == pytest.approx(value, rel=1e-6)
        assert total > 100 * 1e-3, "the stored total is the pre-clip one"
        assert float(ds.post_clip_grad_norm.sel(step=step)) == pytest.approx(1e-3, rel=1e-3)
        assert float(ds.clip_coef.sel(step=step)) == pytest.approx(1e-3 / total, rel=1e-3)
    for cell, value in expected_step1.items():
        assert stored(ds.grad_norm.sel(step=1), cell) == pytest.approx(value, rel=1e-4), cell
    assert trainer.accelerator.__dict__.get("clip_grad_norm_") is None, "the clip wrapper is removed at train end"
    for name in ("gradient_heatmap_A.png", "gradient_heatmap_B.png", "gradient_layer_comparison.png"):
        assert (tmp_path / "track" / "gradient_logs" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "track" / "gradient_flow_final.nc").is_file()


def test_trainer_gradient_accumulation_stores_the_accumulated_gradient(tmp_path):
    model = peft_model("lora")
    rows = torch.randint(0, VOCAB, (4, 12), generator=torch.Generator().manual_seed(4))
    initial = copy.deepcopy(model)
    # by hand: one optimizer step over 4 micro-batches of one row; the Trainer divides each loss by 4
    for i in range(4):
        (lm_loss(initial, rows[i : i + 1]) / 4).backward()
    trainable = [(n, p) for n, p in initial.named_parameters() if p.requires_grad]
    expected = norms_by_cell([(n, p.grad) for n, p in trainable])
    expected_total = float(torch.linalg.norm(torch.cat([p.grad.reshape(-1) for _, p in trainable])))
    single_totals = []  # a tracker that read only one micro-batch would store one of these
    for i in range(4):
        one = copy.deepcopy(model)
        (lm_loss(one, rows[i : i + 1]) / 4).backward()
        single_totals.append(
            float(torch.linalg.norm(torch.cat([p.grad.reshape(-1) for p in one.parameters() if p.requires_grad])))
        )

    tracker, trainer = _train(
        model,
        tmp_path,
        rows,
        max_steps=1,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=4,
        max_grad_norm=0.0,
    )
    ds = tracker.data.sel(step=1)
    for cell, value in expected.items():
        assert stored(ds.grad_norm, cell) == pytest.approx(value, rel=1e-4), cell
    assert float(ds.total_grad_norm) == pytest.approx(expected_total, rel=1e-5)
    assert all(abs(float(ds.total_grad_norm) - t) > 1e-3 * t for t in single_totals)
    assert float(ds.clip_coef) == 1.0
    logged = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    assert float(ds.total_grad_norm) == pytest.approx(logged[0], rel=1e-6)
    # what the optimizer did, against the parameters before and after training
    after = dict(model.named_parameters())
    deltas = norms_by_cell([(n, after[n].detach() - p.detach()) for n, p in trainable])
    weights = norms_by_cell(trainable)
    for cell in expected:
        assert stored(ds.update_ratio, cell) == pytest.approx(deltas[cell] / weights[cell], rel=1e-4), cell


def test_trainer_log_frequency_labels_steps_as_the_trainer_does(tmp_path):
    model = peft_model("ia3")
    rows = torch.randint(0, VOCAB, (2, 12))
    tracker, trainer = _train(model, tmp_path, rows, log_frequency=2, max_steps=5, per_device_train_batch_size=2)
    assert tracker.store.steps == [2, 4]
    logged = {h["step"]: h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h}
    for step in (2, 4):
        assert float(tracker.data.total_grad_norm.sel(step=step)) == pytest.approx(logged[step], rel=1e-6)


def test_callback_without_trainer_refuses_to_record(tmp_path):
    model = peft_model("lora")
    tracker = GradientFlowTracker(model, log_frequency=1, save_dir=tmp_path)
    targs = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=1,
        report_to=[],
        use_cpu=True,
        per_device_train_batch_size=2,
        save_strategy="no",
    )
    trainer = LMTrainer(
        model=model,
        args=targs,
        train_dataset=TokenRows(torch.randint(0, VOCAB, (2, 8))),
        callbacks=[GradientFlowCallback(tracker)],
    )
    with pytest.raises(ValueError, match="bind_trainer"):
        trainer.train()
    assert not (tmp_path / "gradient_logs" / "gradient_flow.nc").exists()


def test_gradients_captured_before_an_engine_clips_are_stored_as_read(tmp_path):
    # the DeepSpeed path: the engine hook reads the gradients, then the engine clips in place and
    # steps; log_step must store what was read (not divide the clipped values), post-clip = total * coef
    model = peft_model("lora")
    _randomize(model, "lora_B")
    tracker = GradientFlowTracker(model, log_frequency=1, save_dir=tmp_path)
    lm_loss(model, torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(3))).backward()
    expected = norms_by_cell([(n, p.grad) for n, p in model.named_parameters() if p.grad is not None])
    tracker.capture_gradients()
    params = [p for p in model.parameters() if p.requires_grad]
    total = torch.nn.utils.clip_grad_norm_(params, 1e-3)
    for p in params:
        p.grad.zero_()  # the engine zeroes after its step: nothing may be read from p.grad any more
    tracker.log_step(1, total_grad_norm=total, max_grad_norm=1e-3)
    torch.optim.SGD(params, lr=0.1).step()
    tracker.log_update()
    ds = tracker.data.sel(step=1)
    for (layer, module, component), value in expected.items():
        assert float(ds.grad_norm.sel(layer=layer, module=module, component=component)) == pytest.approx(
            value, rel=1e-5
        )
    assert float(ds.total_grad_norm) == pytest.approx(float(total), rel=1e-6)
    assert float(ds.post_clip_grad_norm) == pytest.approx(1e-3, rel=1e-3)


# ------------------------------------------------------------------------------ DDP on CPU
DDP_SCRIPT = """
import json, sys
from pathlib import Path
import peft, torch
from safetensors.torch import save_file
from torch.utils.data import Dataset
from transformers import Qwen2Config, Qwen2ForCausalLM, Trainer, TrainingArguments
import torch.nn.functional as F
from perl.trackers import GradientFlowCallback, GradientFlowTracker

out = Path(sys.argv[1])
torch.manual_seed(0)
cfg = Qwen2Config(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
model = peft.get_peft_model(Qwen2ForCausalLM(cfg), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                   init_lora_weights=False))
rows = torch.load(out / "rows.pt")

class Rows(Dataset):
    def __len__(self):
        return len(rows)
    def __getitem__(self, i):
        return {"input_ids": rows[i]}

class LMTrainer(Trainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ids = inputs["input_ids"]
        logits = model(input_ids=ids).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
        return (loss, None) if return_outputs else loss

args = TrainingArguments(output_dir=str(out / "out"), max_steps=2, per_device_train_batch_size=1, max_grad_norm=1e-3,
                         logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
                         ddp_backend="gloo")
initial = {n: p.detach().clone().contiguous() for n, p in model.state_dict().items()}
tracker = GradientFlowTracker(model, log_frequency=1, save_dir=out / "track")
callback = GradientFlowCallback(tracker)
trainer = LMTrainer(model=model, args=args, train_dataset=Rows(), callbacks=[callback])
callback.bind_trainer(trainer)
trainer.train()
if trainer.is_world_process_zero():
    save_file(initial, str(out / "initial.safetensors"))
    (out / "result.json").write_text(json.dumps({"log_history": trainer.state.log_history,
                                                 "world_size": trainer.args.world_size}))
# every rank waits, then the group closes: a rank that exits first with gloo's threads running aborts
# the launch ("terminate called without an active exception"), as perl.cli._leave_process_group says
import torch.distributed as dist
if dist.is_initialized():
    dist.barrier()
    dist.destroy_process_group()
"""


@pytest.mark.distributed
def test_ddp_two_cpu_processes_store_the_synchronised_gradient_once(tmp_path):
    import json
    import shutil
    import socket
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    accelerate = Path(sys.executable).with_name("accelerate")
    if not accelerate.exists() and shutil.which("accelerate") is None:
        pytest.skip("the accelerate launcher is not installed")
    rows = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))
    torch.save(rows, tmp_path / "rows.pt")
    (tmp_path / "ddp_script.py").write_text(DDP_SCRIPT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # --multi_gpu selects accelerate's torchrun launcher; with no GPU the processes use gloo on CPU
    cmd = [
        str(accelerate if accelerate.exists() else shutil.which("accelerate")),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(port),
        str(tmp_path / "ddp_script.py"),
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]

    result = json.loads((tmp_path / "result.json").read_text())
    assert result["world_size"] == 2
    ds = GradientFlowTracker.load(tmp_path / "track" / "gradient_flow_final.nc").data
    logged = {h["step"]: h["grad_norm"] for h in result["log_history"] if "grad_norm" in h}
    assert [int(s) for s in ds.step.values] == sorted(logged) == [1, 2], "one writer, each step once"
    for step, value in logged.items():
        assert float(ds.total_grad_norm.sel(step=step)) == pytest.approx(value, rel=1e-6)
        assert float(ds.post_clip_grad_norm.sel(step=step)) == pytest.approx(1e-3, rel=1e-3)

    # by hand: step 1 used both rows, one per process; DDP averages the two gradients
    model = peft.get_peft_model(tiny_qwen2(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.load_state_dict(load_file(str(tmp_path / "initial.safetensors")))
    ((lm_loss(model, rows[0:1]) + lm_loss(model, rows[1:2])) / 2).backward()
    expected = norms_by_cell([(n, p.grad) for n, p in model.named_parameters() if p.requires_grad])
    for cell, value in expected.items():
        assert stored(ds.grad_norm.sel(step=1), cell) == pytest.approx(value, rel=1e-4), cell
    assert not list((tmp_path / "track" / "gradient_logs").glob(".*.tmp"))

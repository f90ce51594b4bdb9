"""The PEFT method registry on a tiny Qwen2: step-0 outputs, training, MiLoRA init, optimizers, AdaLoRA.

Every test builds its own tiny model (2 layers, hidden 64, seed 0) so that methods which rewrite the
base weights (PiSSA, MiLoRA) cannot leak into each other. CPU only, no network.
"""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from perl.adapters import (
    ALL_METHODS,
    PEFT_METHODS,
    AdaLoraAllocatorCallback,
    build_adapter,
    fit_adalora_schedule,
    milora_factors,
    milora_plus_factors,
)
from perl.config import DEFAULT_TARGET_MODULES, PEFT_TYPES, PeftConfig

VOCAB = 64
# note: methods that move the base weight to the residual W - sBA: the step-0 output is W x up to the
# float32 rounding of that subtraction, not bit-identical
RESIDUAL_METHODS = {"pissa", "milora"}
# note: HRA's H_0 = I is a product of equal reflection pairs, exact in maths, not in float32
ROUNDED_IDENTITY_METHODS = RESIDUAL_METHODS | {"hra"}
ADAPTER_MARKERS = ("lora_", "vera_lambda", "ia3_l", "ln_tuning_layers", "miss_block", "hra_u", "slicefine_slice")
# parameters an adapter owns but never trains (AdaLoRA's current-rank counter)
ADAPTER_FIXED = ("ranknum",)


def tiny_model() -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return Qwen2ForCausalLM(config).eval()


def peft_cfg(method: str, **overrides) -> PeftConfig:
    fields = {
        "type": method,
        "r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "target_modules": list(DEFAULT_TARGET_MODULES),
    }
    fields.update(overrides)
    return PeftConfig(**fields)


def tokens(seed: int, batch: int = 4, length: int = 12) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


class Args:
    """The attributes of transformers' TrainingArguments that the optimizer factories read."""

    learning_rate = 1e-2
    weight_decay = 0.0
    adam_beta1 = 0.9
    adam_beta2 = 0.999
    adam_epsilon = 1e-8


def make_optimizer(setup) -> torch.optim.Optimizer:
    if setup.optimizer_factory is not None:
        return setup.optimizer_factory(setup.model, Args())
    params = [p for p in setup.model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=Args.learning_rate, weight_decay=0.0)


def train_steps(setup, steps: int = 3) -> None:
    model = setup.model
    model.train()
    optimizer = make_optimizer(setup)
    for step in range(steps):
        ids = tokens(100 + step)
        logits = model(input_ids=ids).logits
        # next-token loss computed here, not by the model: AdaLoRA would add its regulariser to a model loss
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def frozen_tensors(model) -> dict[str, torch.Tensor]:
    """Every tensor the optimizer must not touch: frozen parameters and buffers (VeRA's projections)."""
    out = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    out.update({f"buffer:{n}": b.detach().clone() for n, b in model.named_buffers()})
    return out


def base_name(peft_name: str) -> str:
    """``base_model.model.model.layers.0.mlp.up_proj.base_layer.weight`` -> ``model.layers.0.mlp.up_proj.weight``."""
    name = peft_name.removeprefix("base_model.model.")
    return name.replace(".base_layer", "")


def lora_layers(peft_model):
    from peft.tuners.lora.layer import Linear as LoraLinear

    return [(n, m) for n, m in peft_model.named_modules() if isinstance(m, LoraLinear)]


# --------------------------------------------------------------------------------------------------
# registry


def test_registry_names_match_the_config_choices():
    assert PEFT_METHODS == (
        "lora",
        "dora",
        "adalora",
        "pissa",
        "milora",
        "milora_plus",
        "lora_plus",
        "rslora",
        "lorafa",
        "vera",
        "ia3",
        "layernorm",
        "miss",
        "hra",
        "slicefine",
    )
    # the config's `choices` and the registry must agree, or a valid config could fail to build
    assert set(PEFT_TYPES) == set(ALL_METHODS)


def test_unknown_type_names_the_valid_ones():
    cfg = peft_cfg("lora")
    cfg.type = "lorax"
    with pytest.raises(ValueError, match="unknown peft.type 'lorax'.*lora, dora, adalora"):
        build_adapter(tiny_model(), cfg, total_steps=2)


def test_target_module_missing_from_the_model_is_refused():
    with pytest.raises(ValueError, match=r"\['qkv_proj'\] match no module"):
        build_adapter(tiny_model(), peft_cfg("lora", target_modules=["q_proj", "qkv_proj"]), total_steps=2)


def test_all_linear_targets_every_linear_but_the_head():
    setup = build_adapter(tiny_model(), peft_cfg("lora", target_modules="all-linear"), total_steps=2)
    targeted = setup.model.base_model.targeted_module_names
    assert len(targeted) == 14 and not any("lm_head" in n for n in targeted)


# --------------------------------------------------------------------------------------------------
# (a) step 0 and (b) training, for every method


@pytest.mark.parametrize("method", ALL_METHODS)
def test_step0_output_equals_the_base_model(method):
    ids = tokens(1)
    with torch.no_grad():
        reference = tiny_model()(input_ids=ids).logits
    setup = build_adapter(tiny_model(), peft_cfg(method), total_steps=4)
    setup.model.eval()
    with torch.no_grad():
        logits = setup.model(input_ids=ids).logits
    # Why each method is an identity at init: LoRA family B = 0; DoRA B = 0 and m = ||W||_col; AdaLoRA
    # E = 0; VeRA lambda_b = 0; IA3 vectors = 1; LayerNorm tuning copies the norms; MiSS block = 0;
    # MiLoRA+ B = 0; PiSSA / MiLoRA subtract exactly what the adapter adds (up to rounding); HRA's
    # reflections come in equal pairs (H = I up to rounding); SliceFine's slice starts as the base values.
    tol = 2e-5 if method in ROUNDED_IDENTITY_METHODS else 0.0
    torch.testing.assert_close(logits, reference, atol=tol, rtol=0.0)
    assert method in setup.description.split(":")[0]


@pytest.mark.parametrize("method", ALL_METHODS)
def test_training_moves_the_adapter_and_not_the_base(method):
    original = {n: p.detach().clone() for n, p in tiny_model().named_parameters()}
    setup = build_adapter(tiny_model(), peft_cfg(method), total_steps=4)
    model = setup.model
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen = frozen_tensors(model)
    assert trainable, "a method with nothing to train"
    if method != "full":
        assert all(any(k in n for k in ADAPTER_MARKERS) for n in trainable), sorted(trainable)

    train_steps(setup, steps=3)

    after = dict(model.named_parameters())
    unchanged = [n for n, before in trainable.items() if torch.equal(before, after[n].detach())]
    assert not unchanged, f"trainable tensors that did not move in 3 steps: {unchanged}"
    frozen_after = frozen_tensors(model)
    moved = [n for n, before in frozen.items() if not torch.equal(before, frozen_after[n])]
    assert not moved, f"frozen tensors that changed: {moved}"

    if method == "full":
        return
    # the frozen base is the pretrained model itself, except where PiSSA / MiLoRA put the residual
    base = {
        base_name(n): p
        for n, p in model.named_parameters()
        if not any(k in n for k in ADAPTER_MARKERS + ADAPTER_FIXED)
    }
    assert set(base) == set(original), set(base) ^ set(original)
    rewritten = [n for n in original if not torch.equal(original[n], base[n].detach())]
    if method in RESIDUAL_METHODS:
        expected = {
            f"model.layers.{i}.{blk}.{m}.weight"
            for i in range(2)
            for blk, mods in (
                ("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                ("mlp", ("gate_proj", "up_proj", "down_proj")),
            )
            for m in mods
        }
        assert set(rewritten) == expected
    else:
        assert rewritten == []


# --------------------------------------------------------------------------------------------------
# (c) MiLoRA / MiLoRA+ / PiSSA initialisation


def _known_svd(out_dim: int, in_dim: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    k = min(out_dim, in_dim)
    U, _ = torch.linalg.qr(torch.randn(out_dim, k, generator=gen))
    V, _ = torch.linalg.qr(torch.randn(in_dim, k, generator=gen))
    S = torch.linspace(5.0, 0.1, k)  # distinct, descending: the minor subspace is well defined
    return U, S, V, U @ torch.diag(S) @ V.T


def test_milora_factors_are_the_minor_component_of_a_known_matrix():
    U, S, V, W = _known_svd(12, 9, seed=3)
    r, s = 3, 2.5
    A, B, residual = milora_factors(W, r, s)
    minor = U[:, -r:] @ torch.diag(S[-r:]) @ V[:, -r:].T
    torch.testing.assert_close(s * B @ A, minor, atol=1e-5, rtol=0)
    torch.testing.assert_close(residual, W - minor, atol=1e-5, rtol=0)
    # B = U_r sqrt(S_r / s), A = sqrt(S_r / s) V_r^T: column norms of B and row norms of A are sqrt(S_r / s)
    torch.testing.assert_close(B.norm(dim=0), torch.sqrt(S[-r:] / s), atol=1e-5, rtol=0)
    torch.testing.assert_close(A.norm(dim=1), torch.sqrt(S[-r:] / s), atol=1e-5, rtol=0)

    A_plus, B_plus = milora_plus_factors(W, r)
    assert torch.count_nonzero(B_plus) == 0
    torch.testing.assert_close(A_plus.T @ A_plus, V[:, -r:] @ V[:, -r:].T, atol=1e-5, rtol=0)


def test_milora_model_init_spans_the_smallest_singular_directions():
    original = dict(tiny_model().named_parameters())
    setup = build_adapter(tiny_model(), peft_cfg("milora", r=4, lora_alpha=8), total_steps=2)
    layers = lora_layers(setup.model)
    assert len(layers) == 14
    for name, layer in layers:
        W = original[base_name(name) + ".weight"].detach()
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        r, s = layer.r["default"], layer.scaling["default"]
        assert (r, s) == (4, 2.0)
        A = layer.lora_A["default"].weight.detach()
        B = layer.lora_B["default"].weight.detach()
        minor = U[:, -r:] @ torch.diag(S[-r:]) @ Vh[-r:]
        torch.testing.assert_close(s * B @ A, minor, atol=1e-5, rtol=0)
        # the residual base plus the adapter is the original weight
        residual = layer.get_base_layer().weight.detach()
        torch.testing.assert_close(residual + s * B @ A, W, atol=1e-5, rtol=0)
        # and the adapter is not the principal part
        assert (s * B @ A).norm() < 0.5 * (U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]).norm()


def test_milora_plus_model_init_has_b_zero_and_a_the_smallest_right_vectors():
    original = dict(tiny_model().named_parameters())
    setup = build_adapter(tiny_model(), peft_cfg("milora_plus", r=4), total_steps=2)
    for name, layer in lora_layers(setup.model):
        W = original[base_name(name) + ".weight"].detach()
        _, _, Vh = torch.linalg.svd(W, full_matrices=False)
        A = layer.lora_A["default"].weight.detach()
        assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
        # same subspace, whatever the signs the SVD picked: equal projectors
        torch.testing.assert_close(A.T @ A, Vh[-4:].T @ Vh[-4:], atol=1e-5, rtol=0)
        assert torch.equal(layer.get_base_layer().weight.detach(), W)


def test_milora_rank_above_the_weight_rank_is_refused():
    with pytest.raises(ValueError, match="MiLoRA needs 0 < r <= min"):
        build_adapter(tiny_model(), peft_cfg("milora", r=65, target_modules=["q_proj"]), total_steps=2)


def test_pissa_takes_the_largest_singular_directions():
    original = dict(tiny_model().named_parameters())
    setup = build_adapter(tiny_model(), peft_cfg("pissa", r=4), total_steps=2)
    name, layer = lora_layers(setup.model)[0]
    W = original[base_name(name) + ".weight"].detach()
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    s = layer.scaling["default"]
    product = s * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    torch.testing.assert_close(product.detach(), U[:, :4] @ torch.diag(S[:4]) @ Vh[:4], atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------------
# (d) LoRA+ and LoRA-FA optimizers


def test_loraplus_gives_b_ratio_times_the_learning_rate():
    from transformers import TrainingArguments

    setup = build_adapter(tiny_model(), peft_cfg("lora_plus", loraplus_lr_ratio=4.0), total_steps=2)
    args = TrainingArguments(output_dir="unused", learning_rate=3e-4, report_to=[])
    optimizer = setup.optimizer_factory(setup.model, args)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    named = dict(setup.model.named_parameters())
    a_lrs = {lr_of[id(p)] for n, p in named.items() if "lora_A" in n}
    b_lrs = {lr_of[id(p)] for n, p in named.items() if "lora_B" in n}
    assert len(a_lrs) == 1 and a_lrs.pop() == pytest.approx(3e-4)
    assert len(b_lrs) == 1 and b_lrs.pop() == pytest.approx(4.0 * 3e-4)
    assert len(lr_of) == sum(p.requires_grad for p in named.values())


def test_lorafa_trains_b_and_keeps_a_fixed():
    from peft.optimizers.lorafa import LoraFAOptimizer

    setup = build_adapter(tiny_model(), peft_cfg("lorafa"), total_steps=2)
    named = dict(setup.model.named_parameters())
    A0 = {n: p.detach().clone() for n, p in named.items() if "lora_A" in n}
    B0 = {n: p.detach().clone() for n, p in named.items() if "lora_B" in n}
    assert len(A0) == len(B0) == 14 and not any(named[n].requires_grad for n in A0)
    assert isinstance(make_optimizer(setup), LoraFAOptimizer)
    train_steps(setup, steps=2)
    assert all(torch.equal(A0[n], named[n].detach()) for n in A0)
    assert all(not torch.equal(B0[n], named[n].detach()) for n in B0)


# --------------------------------------------------------------------------------------------------
# (e) AdaLoRA: the budget moves because the callback runs


def _nonzero_e(model) -> int:
    return sum(int(torch.count_nonzero(p)) for n, p in model.named_parameters() if "lora_E" in n)


def _budget(step: int, init_bgt: int, target_bgt: int, tinit: int, tfinal: int, total: int) -> int:
    # AdaLoRA's cubic schedule (Zhang et al., 2023, eq. 12), written out independently of peft
    progress = (step - tinit) / (total - tfinal - tinit)
    return int((init_bgt - target_bgt) * (1 - progress) ** 3 + target_bgt)


def _trainer_run(setup, tmp_path, steps: int, with_callback: bool):
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainingArguments

    class RandomTokens(Dataset):
        def __len__(self):
            return 64

        def __getitem__(self, i):
            ids = tokens(1000 + i, batch=1, length=10)[0]
            return {"input_ids": ids, "labels": ids.clone()}

    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = Trainer(
        model=setup.model,
        args=args,
        train_dataset=RandomTokens(),
        callbacks=list(setup.callbacks) if with_callback else [],
    )
    trainer.train()
    return trainer


def test_adalora_budget_moves_under_the_callback_in_a_trainer_run(tmp_path):
    # a schedule of 10 steps, stopped after 5 so the budget is caught half way down
    total, steps = 10, 5
    setup = build_adapter(tiny_model(), peft_cfg("adalora", init_r=6, target_r=2), total_steps=total)
    assert any(isinstance(cb, AdaLoraAllocatorCallback) for cb in setup.callbacks)
    init_bgt, target_bgt = 14 * 6, 14 * 2
    _trainer_run(setup, tmp_path / "with", steps, with_callback=True)
    # the last allocation ran after the optimizer step at global_step = steps - 1
    expected = _budget(steps - 1, init_bgt, target_bgt, tinit=0, tfinal=0, total=total)
    assert target_bgt < expected < init_bgt
    assert _nonzero_e(setup.model) == expected
    pattern = setup.model.peft_config["default"].rank_pattern
    assert sum(sum(v) for v in pattern.values()) == expected
    assert setup.callbacks[0].allocations == steps

    control = build_adapter(tiny_model(), peft_cfg("adalora", init_r=6, target_r=2), total_steps=total)
    _trainer_run(control, tmp_path / "without", steps, with_callback=False)
    assert _nonzero_e(control.model) == init_bgt  # without the callback nothing is ever pruned


def test_adalora_step_without_gradient_signal_keeps_the_budget():
    from transformers import TrainerControl, TrainerState

    setup = build_adapter(tiny_model(), peft_cfg("adalora", init_r=6, target_r=2), total_steps=4)
    model = setup.model
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_E" in n:
                p.fill_(1.0)
    (0.0 * model(input_ids=tokens(5)).logits.sum()).backward()  # every gradient exactly zero
    state = TrainerState()
    state.global_step = 1
    callback = setup.callbacks[0]
    callback.on_optimizer_step(None, state, TrainerControl(), model=model)
    assert (callback.allocations, callback.skipped) == (0, 1)
    assert _nonzero_e(model) == 14 * 6
    # why the guard exists: with all importance scores zero, peft's threshold masks every triplet
    model.base_model.update_and_allocate(1)
    assert _nonzero_e(model) == 0


@pytest.mark.parametrize(
    "total, tinit, tfinal, delta_t",
    [(10, 0, 0, 1), (10, 2, 3, 2), (5, 200, 1000, 1), (2, 0, 0, 1), (3, 0, 0, 50), (6, 5, 0, 1), (1, 0, 0, 1)],
)
def test_fitted_adalora_schedule_always_leaves_an_allocation_step(total, tinit, tfinal, delta_t):
    ti, tf, dt, note = fit_adalora_schedule(total, tinit, tfinal, delta_t)
    allocating = [t for t in range(total) if (ti < t < total - tf and t % dt == 0) or (tf > 0 and t == total - tf)]
    if total >= 2:
        assert allocating, (ti, tf, dt)
    assert (note == "") == ((ti, tf, dt) == (tinit, tfinal, delta_t))
    if tinit + max(tfinal, 1) <= total - 1 and any(t % delta_t == 0 for t in range(tinit + 1, total)):
        assert (ti, tf, dt) == (tinit, tfinal, delta_t)  # a schedule that fits is left alone


# --------------------------------------------------------------------------------------------------
# what the non-LoRA methods target


def test_ia3_scales_the_input_of_down_proj_and_the_output_of_the_rest():
    setup = build_adapter(tiny_model(), peft_cfg("ia3"), total_steps=2)
    shapes = {n.split(".")[-3]: tuple(p.shape) for n, p in setup.model.named_parameters() if "ia3_l" in n}
    assert shapes["down_proj"] == (1, 128)  # input scaling: one entry per input feature
    assert shapes["up_proj"] == (128, 1) and shapes["q_proj"] == (64, 1) and shapes["k_proj"] == (32, 1)
    assert "feed-forward modules ['down_proj']" in setup.description


def test_ia3_feedforward_modules_must_be_targets():
    with pytest.raises(ValueError, match="feedforward_modules.*subset"):
        build_adapter(
            tiny_model(), peft_cfg("ia3", target_modules=["q_proj"], feedforward_modules=["down_proj"]), total_steps=2
        )


def test_layernorm_tuning_trains_the_norms_only():
    setup = build_adapter(tiny_model(), peft_cfg("layernorm"), total_steps=2)
    trainable = [n for n, p in setup.model.named_parameters() if p.requires_grad]
    assert len(trainable) == 5 and all("norm" in n for n in trainable)
    assert "not the configured target_modules" in setup.description


def test_vera_shares_one_projection_pair_sized_for_the_largest_layer():
    setup = build_adapter(tiny_model(), peft_cfg("vera", r=4), total_steps=2)
    base = setup.model.base_model
    assert tuple(base.vera_A["default"].shape) == (4, 128) and tuple(base.vera_B["default"].shape) == (128, 4)
    assert len(base.targeted_module_names) == 14


# --------------------------------------------------------------------------------------------------
# a saved adapter comes back exactly as it was trained


@pytest.mark.parametrize("method, knobs", [(m, {}) for m in PEFT_METHODS] + [("pissa", {"pissa_niter": 2})])
def test_saved_adapter_reloads_onto_the_original_base(method, knobs, tmp_path):
    from perl.adapters import load_trained_adapter

    cfg = peft_cfg(method, **knobs)
    setup = build_adapter(tiny_model(), cfg, total_steps=4)
    train_steps(setup, steps=2)
    setup.model.save_pretrained(str(tmp_path))
    ids = tokens(7)
    with torch.no_grad():
        trained = setup.model(input_ids=ids).logits
        reloaded = load_trained_adapter(tiny_model(), cfg, tmp_path)(input_ids=ids).logits
    torch.testing.assert_close(reloaded, trained, atol=2e-5, rtol=0)


def test_peft_from_pretrained_alone_misses_the_milora_residual(tmp_path):
    # why load_trained_adapter exists: the saved config is plain LoRA, so peft puts B, A on the original W
    from peft import PeftModel

    setup = build_adapter(tiny_model(), peft_cfg("milora"), total_steps=4)
    train_steps(setup, steps=2)
    setup.model.save_pretrained(str(tmp_path))
    ids = tokens(7)
    with torch.no_grad():
        trained = setup.model(input_ids=ids).logits
        naive = PeftModel.from_pretrained(tiny_model(), str(tmp_path)).eval()(input_ids=ids).logits
    assert (naive - trained).abs().max() > 1e-3


def test_full_run_has_no_adapter_to_reload(tmp_path):
    from perl.adapters import load_trained_adapter

    with pytest.raises(ValueError, match="saves the whole model"):
        load_trained_adapter(tiny_model(), peft_cfg("full"), tmp_path)


@pytest.mark.parametrize("method", ["adalora", "ia3", "layernorm", "lora"])
def test_run_attributes_say_what_was_built(method, tmp_path):
    """Stores carry the adapter's own rank and targets: AdaLoRA's init_r, IA3's and LN tuning's module lists."""
    from perl.config import TrainConfig
    from perl.trackers import GradientFlowTracker
    from perl.train import run_attributes

    cfg = TrainConfig()
    cfg.peft = peft_cfg(method, r=4, init_r=6, target_r=3)
    model = build_adapter(tiny_model(), cfg.peft, total_steps=10).model
    built = model.peft_config["default"]
    attrs = run_attributes(cfg, model)
    expected_r = {"adalora": 6, "lora": 4}.get(method)
    assert attrs.get("r") == expected_r
    assert attrs["target_modules"].split(",") == sorted(built.target_modules)
    tracker = GradientFlowTracker(model, log_frequency=1, save_dir=tmp_path, run_attrs=attrs)
    assert tracker.store.attrs.get("r") == expected_r
    assert tracker.store.attrs["target_modules"] == attrs["target_modules"]

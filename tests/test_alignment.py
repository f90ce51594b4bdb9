"""Alignment of adapter updates with the base weights, and intruder dimensions (issue 7).

The pure functions are checked on small random matrices with planted structure and against dense
computations; the tracker on a tiny peft Qwen2 (LoRA, PiSSA, MiLoRA) after a few optimizer steps,
against a dense recomputation from peft's own ``get_delta_weight`` and the untouched base weights.
"""

import numpy as np
import pytest
import torch

from perl.trackers import AlignmentTracker, AlignmentTrackingCallback, RunStore
from perl.trackers import alignment_math as am
from perl.trackers.alignment import BASE_SVD_NAME, INIT_STATE_NAME
from perl.trackers.discovery import discover_adapters

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOL = 1e-6


def orthonormal(m, k, gen):
    return torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64)).Q


def planted_weight(m, n, S, gen):
    """W0 = U diag(S) V^T with known singular vectors (U: m x m, V: n x n, orthogonal)."""
    U, V = orthonormal(m, m, gen), orthonormal(n, n, gen)
    p = min(m, n)
    return U[:, :p] @ torch.diag(torch.as_tensor(S, dtype=torch.float64)) @ V[:, :p].T, U, V


def dense_reference(W0, dW, k, rtol=1e-6, epsilon=0.5):
    """Every quantity from dense SVDs of W0, dW and W0 + dW (the independent path)."""
    W0, dW = W0.double(), dW.double()
    U, S, Vh = torch.linalg.svd(W0, full_matrices=False)
    V, p = Vh.T, S.numel()
    total = torch.linalg.matrix_norm(dW) ** 2
    Ud, Sd, Vdh = torch.linalg.svd(dW, full_matrices=False)
    rho = int((Sd > rtol * Sd[0]).sum()) if Sd[0] > 0 else 0
    Ud, Vd = Ud[:, :rho], Vdh[:rho].T
    Y = torch.linalg.svd(W0 + dW, full_matrices=False).U[:, :k]
    max_cos = (U.T @ Y).abs().amax(0)
    return {
        "update_frobenius_norm": float(torch.sqrt(total)),
        "update_rank": rho,
        "energy_fraction_top_left": float(torch.linalg.matrix_norm(U[:, :k].T @ dW) ** 2 / total),
        "energy_fraction_top_right": float(torch.linalg.matrix_norm(dW @ V[:, :k]) ** 2 / total),
        "energy_fraction_bottom_left": float(torch.linalg.matrix_norm(U[:, p - k :].T @ dW) ** 2 / total),
        "energy_fraction_bottom_right": float(torch.linalg.matrix_norm(dW @ V[:, p - k :]) ** 2 / total),
        "principal_angle_cosines": torch.linalg.svdvals(U[:, :k].T @ Ud).numpy()[: min(k, rho)],
        "amplification_factor": float(torch.sqrt(total) / torch.linalg.matrix_norm(Ud.T @ W0 @ Vd)),
        "intruder_dimensions": int((max_cos < epsilon).sum()),
        "intruder_max_cosine": max_cos.numpy(),
        "base_top": S[:k].numpy(),
        "base_bottom": S[p - k :].flip(0).numpy(),
    }


def factored_metrics(W0, B_t, A_t, s, k, B_0=None, A_0=None):
    base = am.base_svd(W0, k)
    up = am.factored_update_svd(*am.update_factors(B_t, A_t, B_0, A_0), s)
    return {
        "update_frobenius_norm": float(up.frobenius_norm),
        "update_rank": int(up.rank),
        "energy_fraction_top_left": float(am.subspace_energy_fraction(base.U_top, up.U, up.S)),
        "energy_fraction_top_right": float(am.subspace_energy_fraction(base.V_top, up.V, up.S)),
        "energy_fraction_bottom_left": float(am.subspace_energy_fraction(base.U_bottom, up.U, up.S)),
        "energy_fraction_bottom_right": float(am.subspace_energy_fraction(base.V_bottom, up.V, up.S)),
        "principal_angle_cosines": am.principal_angle_cosines(base.U_top, up.U, up.rank).numpy(),
        "amplification_factor": float(am.amplification_factor(W0.double() @ up.V, up.U, up.S, up.rank)),
    }


# ------------------------------------------------------------------ planted structure
@pytest.mark.parametrize("shape", [(40, 30), (30, 40)])
def test_update_inside_top_k_space_scores_one_there_and_zero_in_bottom_k(shape):
    m, n = shape
    gen = torch.Generator().manual_seed(0)
    p, k, r = min(m, n), 6, 3
    W0, U, V = planted_weight(m, n, torch.linspace(10, 1, p), gen)
    # B spans part of U_k, A^T part of V_k: dW lives inside W0's top-k subspaces on both sides
    B = U[:, :k] @ torch.randn(k, r, generator=gen, dtype=torch.float64)
    A = torch.randn(r, k, generator=gen, dtype=torch.float64) @ V[:, :k].T
    got = factored_metrics(W0, B, A, 2.0, k)
    for side in ("left", "right"):
        assert got[f"energy_fraction_top_{side}"] == pytest.approx(1.0, abs=1e-12)
        assert got[f"energy_fraction_bottom_{side}"] == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(got["principal_angle_cosines"], np.ones(r), atol=1e-12)
    # and the mirror image: built from the bottom-k vectors
    B = U[:, p - k : p] @ torch.randn(k, r, generator=gen, dtype=torch.float64)
    A = torch.randn(r, k, generator=gen, dtype=torch.float64) @ V[:, p - k : p].T
    got = factored_metrics(W0, B, A, 2.0, k)
    assert got["energy_fraction_bottom_left"] == pytest.approx(1.0, abs=1e-12)
    assert got["energy_fraction_top_right"] == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(got["principal_angle_cosines"], np.zeros(r), atol=1e-12)


@pytest.mark.parametrize("planted", [1, 3])
def test_update_orthogonal_to_top_vectors_yields_the_planted_intruders(planted):
    gen = torch.Generator().manual_seed(planted)
    m, n, K = 48, 40, 6
    k = K + planted  # the tuned weight's top-k: W0's top K and the planted directions (well separated)
    S = torch.cat([torch.linspace(10, 5, K), torch.linspace(1e-2, 1e-3, n - K)])
    W0, U, _ = planted_weight(m, n, S, gen)
    # intruder directions: orthonormal, orthogonal to W0's top-K left vectors, spread over the rest
    X = torch.linalg.qr(U[:, K:] @ torch.randn(m - K, planted, generator=gen, dtype=torch.float64)).Q
    Yr = orthonormal(n, planted, gen)
    U0 = am.full_left_basis(W0)
    assert (U0.T @ X).abs().max() < 0.5  # the planted vectors are not near any of W0's
    B = X * torch.linspace(30, 20, planted, dtype=torch.float64)  # larger than sigma_1(W0): in the top-k
    dW = B @ Yr.T
    count, max_cos = am.intruder_dimensions(W0 + dW, U0, k)
    assert int(count) == planted
    ref = dense_reference(W0, dW, k)
    assert ref["intruder_dimensions"] == planted
    np.testing.assert_allclose(max_cos.numpy(), ref["intruder_max_cosine"], atol=1e-10)
    # W0 itself has none, and every vector matches itself
    count0, cos0 = am.intruder_dimensions(W0, U0, k)
    assert int(count0) == 0 and np.allclose(cos0.numpy(), 1.0)


def test_factored_results_equal_dense_ones_with_nonzero_init():
    gen = torch.Generator().manual_seed(3)
    m, n, r, k, s = 36, 28, 4, 8, 0.75
    W0 = torch.randn(m, n, generator=gen, dtype=torch.float64)
    B_0, A_0 = (
        torch.randn(m, r, generator=gen, dtype=torch.float64),
        torch.randn(r, n, generator=gen, dtype=torch.float64),
    )
    B_t = B_0 + 0.1 * torch.randn(m, r, generator=gen, dtype=torch.float64)
    A_t = A_0 + 0.1 * torch.randn(r, n, generator=gen, dtype=torch.float64)
    dW = s * (B_t @ A_t - B_0 @ A_0)
    got = factored_metrics(W0, B_t, A_t, s, k, B_0, A_0)
    ref = dense_reference(W0, dW, k)
    assert got["update_rank"] == ref["update_rank"] == 2 * r
    for name, value in got.items():
        np.testing.assert_allclose(value, ref[name], rtol=1e-9, atol=1e-12, err_msg=name)


def test_zero_update_is_nan_and_nonfinite_factors_are_nan():
    gen = torch.Generator().manual_seed(4)
    W0 = torch.randn(20, 16, generator=gen, dtype=torch.float64)
    got = factored_metrics(W0, torch.zeros(20, 2, dtype=torch.float64), torch.randn(2, 16, generator=gen), 1.0, 4)
    assert got["update_frobenius_norm"] == 0.0 and got["update_rank"] == 0
    for name in ("energy_fraction_top_left", "energy_fraction_bottom_right", "amplification_factor"):
        assert np.isnan(got[name]), name
    assert np.isnan(got["principal_angle_cosines"]).all()
    B = torch.randn(20, 2, generator=gen)
    B[0, 0] = float("nan")
    up = am.factored_update_svd(B, torch.randn(2, 16, generator=gen))
    assert not bool(up.finite) and torch.isnan(up.S).all() and torch.isnan(up.frobenius_norm)


def test_randomized_base_svd_finds_the_top_subspace_and_no_bottom():
    gen = torch.Generator().manual_seed(5)
    S = torch.cat([torch.linspace(10, 6, 4), torch.linspace(0.5, 0.01, 26)])
    W0, U, _ = planted_weight(40, 30, S, gen)
    fast = am.base_svd(W0, 4, randomized=True)
    assert fast.randomized and fast.U_bottom is None and fast.S_bottom is None
    np.testing.assert_allclose(fast.S_top.numpy(), S[:4].numpy(), rtol=1e-8)
    # same subspace: the projector onto it matches the planted one
    np.testing.assert_allclose((fast.U_top @ fast.U_top.T).numpy(), (U[:, :4] @ U[:, :4].T).numpy(), atol=1e-8)


def test_randomized_base_svd_of_a_narrow_weight_is_the_exact_svd():
    # k + oversample columns reach min(m, n): the range finder would span everything, so the exact SVD answers
    gen = torch.Generator().manual_seed(6)
    W0 = torch.randn(12, 10, generator=gen, dtype=torch.float64)
    fast, exact = am.base_svd(W0, 4, randomized=True), am.base_svd(W0, 4)
    assert fast.randomized and fast.U_bottom is None
    np.testing.assert_allclose(fast.S_top.numpy(), torch.linalg.svdvals(W0)[:4].numpy(), rtol=1e-12)
    np.testing.assert_allclose((fast.U_top @ fast.U_top.T).numpy(), (exact.U_top @ exact.U_top.T).numpy(), atol=1e-10)
    np.testing.assert_allclose((fast.U_top * fast.S_top) @ fast.V_top.T, (exact.U_top * exact.S_top) @ exact.V_top.T)


# ------------------------------------------------------------------ the tracker on a tiny model
def tiny_model(seed=0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return Qwen2ForCausalLM(config)


def peft_model(method="lora", r=4):
    """(peft model, {module name: original dense weight before any residual split})."""
    from peft import LoraConfig, get_peft_model

    base = tiny_model()
    originals = {n: p.detach().clone().double() for n, p in base.named_parameters()}
    init = "pissa" if method == "pissa" else True
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init))
    if method == "milora":
        from perl.adapters.milora import apply_minor_init

        apply_minor_init(model, "milora")
    return model, originals


def train_steps(model, n, seed=0):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-2)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randint(0, 96, (2, 12), generator=gen)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()


def dense_deltas(model):
    return {
        a.name: a.peft_module.get_delta_weight(a.adapter).detach().double().clone() for a in discover_adapters(model)
    }


def check_against_dense(ds, step, model, originals, init_deltas, k, with_intruders):
    checked = 0
    for a in discover_adapters(model):
        W0 = originals[a.name + ".weight"]  # the weight before peft touched it (before PiSSA's split)
        dW = a.peft_module.get_delta_weight(a.adapter).detach().double() - init_deltas[a.name]
        ref = dense_reference(W0, dW, k)
        cell = ds.sel(step=step, layer=a.layer, module=a.module)
        for name in (
            "update_frobenius_norm",
            "update_rank",
            "energy_fraction_top_left",
            "energy_fraction_top_right",
            "energy_fraction_bottom_left",
            "energy_fraction_bottom_right",
            "amplification_factor",
        ):
            np.testing.assert_allclose(float(cell[name]), ref[name], rtol=1e-5, atol=TOL, err_msg=f"{a.name} {name}")
        cos = cell.principal_angle_cosines.values
        np.testing.assert_allclose(
            cos[: ref["principal_angle_cosines"].size], ref["principal_angle_cosines"], atol=TOL
        )
        assert np.isnan(cos[ref["principal_angle_cosines"].size :]).all()
        static = ds.sel(layer=a.layer, module=a.module)
        np.testing.assert_allclose(static.base_singular_values_top.values, ref["base_top"], rtol=1e-5)
        np.testing.assert_allclose(static.base_singular_values_bottom.values, ref["base_bottom"], rtol=1e-5, atol=1e-6)
        if with_intruders:
            assert int(cell.intruder_dimensions) == ref["intruder_dimensions"]
            np.testing.assert_allclose(cell.intruder_max_cosine.values, ref["intruder_max_cosine"], atol=1e-5)
        else:
            assert np.isnan(float(cell.intruder_dimensions))
        checked += 1
    return checked


def test_tracker_on_tiny_lora_equals_dense_recomputation(tmp_path):
    model, originals = peft_model("lora")
    zero = {n: torch.zeros_like(d) for n, d in dense_deltas(model).items()}
    tracker = AlignmentTracker(model, log_frequency=1, save_dir=tmp_path, intruder_log_frequency=3)
    snap0 = tracker.log_step(0)
    assert (snap0.update_frobenius_norm.values == 0).all()  # B = 0: zero update
    assert np.isnan(snap0.energy_fraction_top_left.values).all()  # 0/0, documented
    assert (snap0.intruder_dimensions.values == 0).all() and (snap0.intruder_max_cosine.values == 1).all()
    train_steps(model, 2)
    tracker.log_step(2)
    train_steps(model, 1, seed=1)
    tracker.log_step(3)
    ds = tracker.data
    assert list(ds.step.values) == [0, 2, 3]
    assert check_against_dense(ds, 3, model, originals, zero, 8, with_intruders=True) == 14
    assert tracker.save() == tmp_path / "alignment_final.nc"
    final = RunStore.open(tmp_path / "alignment_final.nc")
    assert final.energy_fraction_top_left.attrs["formula"].startswith("||U_k^T dW||_F^2")
    assert final.attrs["intruder_epsilon"] == 0.5 and "svd" in final.attrs["base_svd_method"]
    assert RunStore.is_store(tmp_path / "alignment_logs" / "alignment_history.nc")  # a folder of netCDF files
    assert (tmp_path / "alignment_logs" / BASE_SVD_NAME).is_file()
    # a random low-rank update is near the chance level k/m, not at 0 or 1
    chance = final.chance_energy_fraction_left.sel(module="gate_proj").values
    assert np.allclose(chance, 8 / 128)


def test_intermediate_step_equals_dense_and_intruders_off_are_not_declared(tmp_path):
    model, originals = peft_model("lora")
    zero = {n: torch.zeros_like(d) for n, d in dense_deltas(model).items()}
    tracker = AlignmentTracker(model, log_frequency=1, save_dir=tmp_path, intruder_log_frequency=0)
    tracker.log_step(0)
    train_steps(model, 2)
    ds = tracker.log_step(2)
    assert "intruder_dimensions" not in ds and "intruder_sv" not in ds.dims
    ds = ds.assign(intruder_dimensions=ds.update_rank * np.nan)
    assert check_against_dense(ds, 2, model, originals, zero, 8, with_intruders=False) == 14


@pytest.mark.parametrize("method", ["pissa", "milora"])
def test_pissa_and_milora_use_the_weight_before_the_residual_split(method, tmp_path):
    model, originals = peft_model(method)
    init_deltas = dense_deltas(model)
    a0 = discover_adapters(model)[0]
    residual = a0.base_weight().double()
    assert not torch.allclose(residual, originals[a0.name + ".weight"])  # the split did move the base weight
    tracker = AlignmentTracker(model, log_frequency=1, save_dir=tmp_path, intruder_log_frequency=1)
    tracker.log_step(0)
    train_steps(model, 2)
    tracker.log_step(2)
    ds = tracker.data
    assert check_against_dense(ds, 2, model, originals, init_deltas, 8, with_intruders=True) == 14
    # the residual's spectrum differs (PiSSA removed the top, MiLoRA the bottom): W_res could not pass
    res = torch.linalg.svdvals(residual).numpy()
    stored = ds.sel(layer=a0.layer, module=a0.module)
    stored = np.concatenate([stored.base_singular_values_top.values, stored.base_singular_values_bottom.values])
    assert not np.allclose(stored, np.concatenate([res[:8], res[::-1][:8]]), rtol=1e-3, atol=1e-6)


def test_intruder_basis_cache_budget_and_base_svd_reload(tmp_path, monkeypatch):
    model, _ = peft_model("pissa")
    cached = AlignmentTracker(model, log_frequency=1, save_dir=tmp_path / "a", intruder_log_frequency=1)
    uncached = AlignmentTracker(
        model, log_frequency=1, save_dir=tmp_path / "b", intruder_log_frequency=1, intruder_cache_mb=0
    )
    cached.log_step(0)
    uncached.log_step(0)
    assert cached._basis_cache and not uncached._basis_cache
    train_steps(model, 2)
    x, y = cached.log_step(2), uncached.log_step(2)
    np.testing.assert_array_equal(x.intruder_dimensions.values, y.intruder_dimensions.values)
    np.testing.assert_allclose(x.intruder_max_cosine.values, y.intruder_max_cosine.values, atol=1e-6)
    # a tracker over the same folder and weights reloads the base SVD instead of recomputing it
    again = AlignmentTracker(model, log_frequency=1, save_dir=tmp_path / "a", intruder_log_frequency=1)
    again._init = cached._init
    again._reset_base()

    def refuse(*args, **kwargs):
        raise AssertionError("the base SVD should have been reloaded from base_svd.safetensors")

    monkeypatch.setattr(am, "base_svd", refuse)
    z = again.snapshot(2, intruders=True)
    for name in ("energy_fraction_top_left", "energy_fraction_bottom_right", "intruder_dimensions"):
        np.testing.assert_allclose(z[name].values, x[name].values, rtol=1e-5, atol=1e-6, err_msg=name)


def test_vector_methods_record_nothing(tmp_path):
    from peft import IA3Config, get_peft_model

    model = get_peft_model(
        tiny_model(), IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"])
    )
    tracker = AlignmentTracker(model, save_dir=tmp_path)
    assert not tracker.enabled and tracker.log_step(0) is None and tracker.steps == []


def test_bad_arguments_are_one_clear_error():
    model, _ = peft_model("lora")
    with pytest.raises(ValueError, match="intruder_epsilon"):
        AlignmentTracker(model, intruder_epsilon=2.0)
    with pytest.raises(ValueError, match="top_k"):
        AlignmentTracker(model, top_k=0)


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


def test_callback_steps_intruders_and_resume_restore_the_pre_split_weight(tmp_path):
    model, originals = peft_model("pissa")
    tracker = AlignmentTracker(model, log_frequency=2, save_dir=tmp_path, intruder_log_frequency=4)
    trainer = _trainer(model, tmp_path, max_steps=5, callbacks=[AlignmentTrackingCallback(tracker)])
    trainer.train()
    first = RunStore.open(tmp_path / "alignment_final.nc")
    assert list(first.step.values) == [0, 2, 4, 5]
    has_intruders = np.isfinite(first.intruder_dimensions.values).all(axis=(1, 2))
    assert has_intruders.tolist() == [True, False, True, True]  # every 4 steps and the final step
    assert any("alignment/energy_fraction_top_left_mean" in h for h in trainer.state.log_history)
    assert (tmp_path / "checkpoint-4" / INIT_STATE_NAME).is_file()

    # resume in a fresh model whose B, A are not the init: only the checkpoint restores B_0 A_0 (and W0)
    model2, _ = peft_model("pissa")
    with torch.no_grad():
        for p in model2.parameters():
            if p.requires_grad:
                p.add_(0.5)
    tracker2 = AlignmentTracker(model2, log_frequency=2, save_dir=tmp_path, intruder_log_frequency=4)
    trainer2 = _trainer(model2, tmp_path, max_steps=5, callbacks=[AlignmentTrackingCallback(tracker2)])
    trainer2.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    resumed = RunStore.open(tmp_path / "alignment_final.nc")
    assert list(resumed.step.values) == [0, 2, 4, 5]
    np.testing.assert_allclose(
        resumed.base_singular_values_top.values, first.base_singular_values_top.values, rtol=1e-6
    )
    a = discover_adapters(model2)[0]
    np.testing.assert_allclose(
        resumed.base_singular_values_top.sel(layer=a.layer, module=a.module).values,
        torch.linalg.svdvals(originals[a.name + ".weight"])[:8].numpy(),
        rtol=1e-5,
    )
    for name in ("energy_fraction_top_left", "energy_fraction_bottom_left", "amplification_factor"):
        np.testing.assert_allclose(
            resumed[name].sel(step=5).values, first[name].sel(step=5).values, rtol=1e-3, atol=1e-5, err_msg=name
        )


@pytest.mark.parametrize("shape", [(50, 20), (20, 50), (30, 30)])
def test_top_left_singular_vectors_match_the_svd(shape):
    gen = torch.Generator().manual_seed(6)
    W = torch.randn(*shape, generator=gen, dtype=torch.float64)
    U = torch.linalg.svd(W, full_matrices=False).U[:, :5]
    Y = am.top_left_singular_vectors(W, 5)
    np.testing.assert_allclose((U.T @ Y).abs().diagonal().numpy(), np.ones(5), atol=1e-10)
    # rank-deficient: the Gram route cannot normalise, the SVD fallback still gives orthonormal vectors
    low_rank = W[:, :2] @ torch.randn(2, shape[1], generator=gen, dtype=torch.float64)
    Z = am.top_left_singular_vectors(low_rank, 5)
    np.testing.assert_allclose((Z.T @ Z).numpy(), np.eye(5), atol=1e-10)


@pytest.mark.parametrize("method", ["dora", "adalora", "vera", "miss", "rslora", "hra", "slicefine"])
def test_other_factored_methods_equal_dense_recomputation(method, tmp_path):
    from types import SimpleNamespace

    registry = pytest.importorskip("perl.adapters.registry")
    base = tiny_model()
    originals = {n: p.detach().clone().double() for n, p in base.named_parameters()}
    cfg = SimpleNamespace(
        type=method,
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=TARGETS,
        init_r=6,
        target_r=3,
        miss_init="balance",
    )
    model = registry.build_adapter(base, cfg, total_steps=3).model

    def peft_delta(a):  # peft's own dense delta, independent of discovery's factors
        m = a.peft_module
        if a.kind == "miss":
            w0 = m.get_base_layer().weight.detach()
            return (m.get_delta_weight_miss(a.adapter, w0.clone()) - w0).detach().double()
        if a.kind == "hra":  # peft's HRA returns the rotation H; the weight is W0 @ H
            w0 = m.get_base_layer().weight.detach().double()
            return (w0 @ m.get_delta_weight(a.adapter).detach().double() - w0).detach()
        return m.get_delta_weight(a.adapter).detach().double()

    init = {a.name: peft_delta(a) for a in discover_adapters(model)}
    tracker = AlignmentTracker(model, log_frequency=1, save_dir=tmp_path, intruder_log_frequency=0)
    tracker.log_step(0)
    train_steps(model, 2)
    ds = tracker.log_step(2)
    for a in discover_adapters(model):
        k = int(ds.alignment_k.sel(layer=a.layer, module=a.module))
        ref = dense_reference(originals[a.name + ".weight"], peft_delta(a) - init[a.name], k)
        cell = ds.sel(step=2, layer=a.layer, module=a.module)
        for name in ("energy_fraction_top_left", "energy_fraction_bottom_right", "amplification_factor"):
            np.testing.assert_allclose(float(cell[name]), ref[name], rtol=1e-5, atol=TOL, err_msg=f"{a.name} {name}")


def test_from_config_reads_knobs_with_defaults(tmp_path):
    from perl.config import TrackerConfig

    model, _ = peft_model("lora")
    tc = TrackerConfig(enable_alignment_tracking=True, alignment_log_frequency=7)
    tracker = AlignmentTracker.from_config(tc, model, tmp_path, peft_type="lora", run_attrs={"seed": 3})
    assert tracker.log_frequency == 7 and tracker.intruder_log_frequency == 70 and tracker.epsilon == 0.5
    assert tracker.top_k is None and tracker.attrs["seed"] == 3
    tc.intruder_epsilon, tc.alignment_top_k, tc.intruder_log_frequency = 0.3, 5, 0  # knobs the lead may add
    tracker = AlignmentTracker.from_config(tc, model, tmp_path)
    assert (tracker.epsilon, tracker.top_k, tracker.intruder_log_frequency) == (0.3, 5, 0)

"""Synthetic run folders: the real layout and schema, with made-up but plausible numbers.

Plots, explorers, the report, their tests and the latency benchmark need runs of any size without
training a model. `synthetic_run` writes a folder exactly as a tracked training run leaves it
(docs/architecture.md, "Run folder"): ``config.yaml`` (a real `TrainConfig`), ``metrics.jsonl``
(TRL's log keys), the live stores and the ``*_final.nc`` files (written by the real `RunStore`),
the summaries and the gradient PNGs.

The dynamics are invented: singular values grow from zero (LoRA's B = 0 at init) and concentrate
in the top directions; gradients of A start at exactly zero for the same reason; reward rises.
The metrics are computed from the synthetic spectra with the definitions written in each
variable's ``formula`` attribute, so they are consistent with the singular values they sit beside.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import xarray as xr

__all__ = ["synthetic_run", "SPECTRAL_METRICS", "DEFAULT_MODULES"]

DEFAULT_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# name -> (long_name, units, formula) for the per-(step, layer, module) spectrum metrics
SPECTRAL_METRICS = {
    "spectral_gap": ("spectral gap", "1", "s_1 - s_2"),
    "condition_number": ("condition number", "1", "s_max / s_min over s > 1e-6 s_max; NaN for a zero matrix"),
    "effective_rank": ("effective rank (participation ratio)", "1", "(sum s)^2 / sum s^2; 0 for a zero matrix"),
    "entropy_effective_rank": ("entropy effective rank", "1", "exp(-sum p log p), p = s / sum s; 0 for a zero matrix"),
    "stable_rank": ("stable rank", "1", "sum s^2 / s_max^2; 0 for a zero matrix"),
    "nuclear_norm": ("nuclear norm", "1", "sum s"),
    "frobenius_norm": ("Frobenius norm", "1", "sqrt(sum s^2)"),
    "top1_sv_ratio": ("energy in the top singular value", "1", "s_1^2 / sum s^2; NaN for a zero matrix"),
    "top5_sv_ratio": ("energy in the top 5 singular values", "1", "sum_{i<=5} s_i^2 / sum s^2; NaN for a zero matrix"),
    "top10_sv_ratio": ("energy in the top 10 singular values", "1", "sum_{i<=10} s_i^2 / sum s^2; NaN for a zero matrix"),
    "numerical_rank": ("numerical rank", "1", "count of s > 1e-6 s_max"),
}

_COMPONENTS = {"dora": ("A", "B", "magnitude"), "adalora": ("A", "B", "E"), "ia3": ("ia3",), "ln_tuning": ("ln",)}
_VECTOR = ("ia3", "ln_tuning")  # vector adapters: norms, no spectrum
_NONZERO_INIT = ("pissa", "milora", "milora_plus")


def synthetic_run(
    out_dir,
    steps: int = 20,
    layers: int = 4,
    modules=("q_proj", "v_proj"),
    r: int = 8,
    seed: int = 0,
    method: str = "lora",
    every: int = 1,
    unadapted=(),
    final: bool = True,
    pngs: bool = True,
) -> Path:
    """Write a synthetic tracked run folder and return its path.

    Usage:
        >>> run_dir = synthetic_run("runs/fake", steps=50, layers=4, modules=("q_proj", "v_proj"), r=8)
        >>> perl.open_run(run_dir).spectral.singular_values.sel(layer=2, module="v_proj")

    Args:
        out_dir (str | Path): the run folder; existing stores in it are replaced.
        steps (int, default 20): number of stored snapshots. Spectral steps are
            ``0, every, ..., (steps-1)*every`` (0 = initialisation); gradient and metric steps are
            ``every, ..., steps*every`` (the s-th optimizer step).
        layers (int or list of int, default 4): number of blocks, or the block indices tracked.
        modules (sequence of str, default ("q_proj", "v_proj")): adapted module names.
        r (int, default 8): adapter rank.
        seed (int, default 0): seed of the noise, also written as the run's seed.
        method (str, default "lora"): peft type; "dora" adds magnitude/direction variables and the
            ``magnitude`` gradient component, "adalora" the rank budget, importance scores and
            ``E``; "pissa"/"milora" start from a nonzero product (update since init differs);
            "ia3"/"ln_tuning" store vector norms only (no ``sv`` dimension).
        every (int, default 1): optimizer steps between snapshots.
        unadapted (sequence of str, default ()): modules present in the Dataset but not adapted
            (all their values NaN, as a method that does not adapt them stores them).
        final (bool, default True): also write the ``*_final.nc`` files (a finished run);
            False looks like a run still training.
        pngs (bool, default True): write the gradient heatmap PNGs (matplotlib).
    """
    from perl import __version__
    from perl.config import TrainConfig, apply_overrides, save_config
    from perl.trackers.store import RunStore

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("spectral_logs", "gradient_logs"):
        shutil.rmtree(out / stale, ignore_errors=True)
    for stale in ("spectral_history_final.nc", "gradient_flow_final.nc", "metrics.jsonl"):
        (out / stale).unlink(missing_ok=True)

    rng = np.random.default_rng(seed)
    layer_ids = np.arange(layers) if np.isscalar(layers) else np.asarray(layers, dtype=int)
    modules = [*modules, *[m for m in unadapted if m not in modules]]
    adapted = np.array([m not in unadapted for m in modules])
    alpha = 2 * r
    cfg = apply_overrides(
        TrainConfig(),
        {
            "peft.type": method,
            "peft.r": r,
            "peft.lora_alpha": alpha,
            "peft.target_modules": [m for m in modules if m not in unadapted],
            "common.seed": seed,
            "training.output_dir": str(out),
            "training.max_steps": steps * every,
            "tracker.enable_spectral_tracking": True,
            "tracker.enable_gradient_tracking": True,
            "tracker.spectral_log_frequency": every,
            "tracker.gradient_log_frequency": every,
        },
    )
    save_config(cfg, out / "config.yaml")
    config_yaml = (out / "config.yaml").read_text(encoding="utf-8")
    attrs = {
        "peft_type": method,
        "r": r,
        "lora_alpha": alpha,
        "scaling": alpha / r,
        "target_modules": [m for m in modules if m not in unadapted],
        "model_name_or_path": cfg.model.model_name_or_path,
        "seed": seed,
        "config_yaml": config_yaml,
        "perl_version": __version__,
        "Conventions": "CF-1.8",
        "source": "perl.viz.synthetic (made-up dynamics, real schema)",
    }

    spectral = _spectral_dataset(rng, steps, every, layer_ids, modules, adapted, r, method)
    spectral.attrs.update(attrs)
    gradients = _gradient_dataset(rng, steps, every, layer_ids, modules, adapted, method, cfg)
    gradients.attrs.update(attrs)

    live = RunStore(out / "spectral_logs" / "spectral_history.nc", attrs=attrs)
    live.append(spectral)
    glive = RunStore(out / "gradient_logs" / "gradient_flow.nc", attrs=attrs)
    glive.append(gradients)
    if final:
        live.finalize(out / "spectral_history_final.nc")
        glive.finalize(out / "gradient_flow_final.nc")
    _write_summaries(out, spectral, gradients)
    _write_metrics(out / "metrics.jsonl", rng, steps, every, gradients, final)
    if pngs:
        _write_pngs(out / "gradient_logs", gradients)
    return out


# ------------------------------------------------------------------------------ spectra
def spectrum_metrics(sv: np.ndarray) -> dict[str, np.ndarray]:
    """The SPECTRAL_METRICS of spectra ``sv[..., k]`` (descending, NaN rows stay NaN)."""
    s = np.where(np.isfinite(sv), sv, 0.0).astype(np.float64)
    missing = ~np.isfinite(sv).any(axis=-1)
    smax = s.max(axis=-1)
    total = s.sum(axis=-1)
    energy = (s**2).sum(axis=-1)
    zero = smax <= 0
    with np.errstate(divide="ignore", invalid="ignore"):
        keep = s > 1e-6 * smax[..., None]
        smin = np.where(keep, s, np.inf).min(axis=-1)
        p = s / total[..., None]
        plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
        cum = np.cumsum(np.sort(s, axis=-1)[..., ::-1] ** 2, axis=-1)
        k = s.shape[-1]
        out = {
            "spectral_gap": s[..., 0] - (s[..., 1] if k > 1 else 0.0),
            "condition_number": np.where(zero, np.nan, smax / smin),
            "effective_rank": np.where(zero, 0.0, total**2 / energy),
            "entropy_effective_rank": np.where(zero, 0.0, np.exp(-plogp.sum(axis=-1))),
            "stable_rank": np.where(zero, 0.0, energy / smax**2),
            "nuclear_norm": total,
            "frobenius_norm": np.sqrt(energy),
            "top1_sv_ratio": np.where(zero, np.nan, cum[..., 0] / energy),
            "top5_sv_ratio": np.where(zero, np.nan, cum[..., min(5, k) - 1] / energy),
            "top10_sv_ratio": np.where(zero, np.nan, cum[..., min(10, k) - 1] / energy),
            "numerical_rank": np.where(zero, 0.0, keep.sum(axis=-1)).astype(np.float64),
        }
    return {name: np.where(missing, np.nan, v) for name, v in out.items()}


def _spectral_dataset(rng, steps, every, layer_ids, modules, adapted, r, method) -> xr.Dataset:
    S, L, M = steps, len(layer_ids), len(modules)
    t = np.arange(S)[:, None, None, None] / max(S - 1, 1)
    depth = (0.5 + np.arange(L) / max(L, 1))[None, :, None, None]
    module_scale = rng.uniform(0.6, 1.4, size=M)[None, None, :, None]
    i = np.arange(2 * r)[None, None, None, :] + 1.0
    # rank concentrates: the decay exponent of the spectrum grows during training
    decay = 0.4 + 1.6 * t
    growth = 1.0 - np.exp(-4.0 * t)
    noise = 1.0 + 0.05 * rng.standard_normal((S, L, M, 2 * r))
    update = np.sort(0.05 * depth * module_scale * growth * i**-decay * noise, axis=-1)[..., ::-1]
    if method in _NONZERO_INIT:
        # principal (PiSSA) or minor (MiLoRA) directions of W0: a large product from step 0
        init = (1.0 if method == "pissa" else 0.1) * module_scale * (np.arange(r) + 1.0) ** -0.5
        product = np.sort(init + update[..., :r], axis=-1)[..., ::-1]
    else:
        # LoRA-like: B = 0 at init, the update since init is the product (rank <= r, rest zero)
        product = update[..., :r].copy()
        update = np.concatenate([product, np.zeros_like(product)], axis=-1)
    product[~np.broadcast_to(adapted[None, None, :, None], product.shape)] = np.nan
    update[~np.broadcast_to(adapted[None, None, :, None], update.shape)] = np.nan

    dims = ("step", "layer", "module")
    coords = {"step": np.arange(S, dtype=np.int64) * every, "layer": layer_ids.astype(np.int64), "module": list(modules)}
    data = {
        "singular_values": (
            (*dims, "sv"),
            product.astype(np.float32),
            {"long_name": "singular value of s·B·A", "units": "1", "formula": "singular values of R_b R_a^T (factored)"},
        ),
        "update_singular_values": (
            (*dims, "sv_update"),
            update.astype(np.float32),
            {"long_name": "singular value of the update since init", "units": "1", "formula": "s (B_t A_t - B_0 A_0), rank <= 2r"},
        ),
    }
    for prefix, spectra, what in (("", product, "of s·B·A"), ("update_", update, "of the update since init")):
        for name, values in spectrum_metrics(spectra).items():
            long_name, units, formula = SPECTRAL_METRICS[name]
            data[prefix + name] = (dims, values.astype(np.float32), {"long_name": f"{long_name} {what}", "units": units, "formula": formula})
    if method == "dora":
        mag = 1.0 + 0.02 * growth[..., 0] * depth[..., 0] + 0.002 * rng.standard_normal((S, L, M))
        direction = np.broadcast_to(1.0 + 0.01 * growth[..., 0] * module_scale[..., 0] * depth[..., 0], (S, L, M))
        mag, direction = np.where(adapted, mag, np.nan), np.where(adapted, direction, np.nan)
        data["magnitude_norm"] = (dims, mag.astype(np.float32), {"long_name": "DoRA magnitude norm", "units": "1", "formula": "||m||_2"})
        data["direction_norm"] = (dims, direction.astype(np.float32), {"long_name": "DoRA direction norm", "units": "1", "formula": "||(W0 + sBA) / ||W0 + sBA||_col||_F"})
        data["magnitude_direction_ratio"] = (dims, (mag / direction).astype(np.float32), {"long_name": "DoRA magnitude / direction", "units": "1", "formula": "magnitude_norm / direction_norm"})
    if method == "adalora":
        importance = np.abs(update[..., :r]) * (1 + 0.3 * rng.standard_normal((S, L, M, r)))
        budget = np.round(r - (r / 2) * t[..., 0] * (1 + 0.2 * rng.standard_normal((S, L, M))))
        budget = np.where(adapted, np.clip(budget, 1, r), np.nan)
        data["rank_budget"] = (dims, budget.astype(np.float32), {"long_name": "AdaLoRA rank budget", "units": "1", "formula": "count of nonzero E entries"})
        data["importance_scores"] = ((*dims, "sv"), importance.astype(np.float32), {"long_name": "AdaLoRA importance score", "units": "1", "formula": "smoothed sensitivity x uncertainty"})
    if method in _VECTOR:
        norm = np.broadcast_to(1.0 + 0.05 * growth[..., 0] * depth[..., 0] * module_scale[..., 0], (S, L, M))
        dist = norm - 1.0
        data = {
            "vector_norm": (dims, np.where(adapted, norm, np.nan).astype(np.float32), {"long_name": "adapter vector norm (IA3 / LayerNorm tuning)", "units": "1", "formula": "||v||_2"}),
            "vector_distance_from_init": (dims, np.where(adapted, dist, np.nan).astype(np.float32), {"long_name": "adapter vector distance from init", "units": "1", "formula": "||v_t - v_0||_2"}),
        }
        ds = xr.Dataset(data, coords=coords)
        ds["step"].attrs.update(long_name="optimizer step", units="steps")
        ds["layer"].attrs.update(long_name="layer (transformer block)", units="1")
        return ds
    ds = xr.Dataset(data, coords=coords)
    ds["sv"] = ("sv", np.arange(r, dtype=np.int64), {"long_name": "singular value index (0 = largest)", "units": "1"})
    ds["sv_update"] = ("sv_update", np.arange(2 * r, dtype=np.int64), {"long_name": "update singular value index", "units": "1"})
    ds["step"].attrs.update(long_name="optimizer step", units="steps")
    ds["layer"].attrs.update(long_name="layer (transformer block)", units="1")
    return ds


# ------------------------------------------------------------------------------ gradients
def _gradient_dataset(rng, steps, every, layer_ids, modules, adapted, method, cfg) -> xr.Dataset:
    S, L, M = steps, len(layer_ids), len(modules)
    components = _COMPONENTS.get(method, ("A", "B"))
    C = len(components)
    t = (np.arange(S)[:, None, None, None] + 1) / S
    depth = np.linspace(1.5, 0.7, L)[None, :, None, None]  # early layers get more gradient
    scale = {"A": 1e-3 * (1 - np.exp(-6 * t)), "B": 2e-3 * (0.3 + np.exp(-3 * t)), "magnitude": 5e-4 + 0 * t, "E": 3e-4 + 0 * t,
             "ia3": 4e-4 + 0 * t, "ln": 2e-4 + 0 * t}
    base = np.concatenate([np.broadcast_to(scale[c], (S, 1, 1, 1)) for c in components], axis=-1)
    noise = np.exp(0.3 * rng.standard_normal((S, L, M, C)))
    grad = base * depth * noise
    if method not in _NONZERO_INIT and "A" in components:
        grad[0, ..., components.index("A")] = 0.0  # B = 0 before the first step: dL/dA = B^T (...) = 0
    grad[:, :, ~adapted, :] = np.nan
    weight = np.concatenate([np.broadcast_to(w, (S, 1, 1, 1)) for w in (_weight_norm(c, t, method) for c in components)], axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(weight > 0, grad / weight, np.nan)
        update = np.where(weight > 0, 10 * cfg.training.learning_rate * noise / weight, np.nan)
    update[:, :, ~adapted, :] = np.nan
    r_numel = 8  # elements per tracked tensor / 64: the sizes are made up, only "0 = not tracked" matters
    total = np.sqrt(np.nansum(grad**2, axis=(1, 2, 3)))
    max_norm = cfg.training.max_grad_norm
    clip = np.minimum(1.0, max_norm / (total + 1e-6)) if max_norm > 0 else np.ones_like(total)

    dims = ("step", "layer", "module", "component")
    ds = xr.Dataset(
        {
            "grad_norm": (dims, grad.astype(np.float32), {"long_name": "gradient norm (accumulated, pre-clip)", "units": "1", "formula": "||dL/dθ||_F"}),
            "weight_norm": (dims, np.where(np.isnan(grad), np.nan, weight).astype(np.float32), {"long_name": "weight norm (before the step)", "units": "1", "formula": "||θ||_F"}),
            "numel": (dims[1:], np.where(adapted[None, :, None], 64 * r_numel, 0).astype(np.int64) * np.ones((L, M, C), dtype=np.int64), {"long_name": "elements tracked", "units": "1", "description": "0 = not tracked"}),
            "grad_to_weight_ratio": (dims, ratio.astype(np.float32), {"long_name": "gradient / weight norm", "units": "1", "formula": "||g||_F / ||θ||_F; NaN where θ = 0"}),
            "update_ratio": (dims, update.astype(np.float32), {"long_name": "update / weight norm", "units": "1", "formula": "||Δθ||_F / ||θ||_F; NaN where θ = 0"}),
            "total_grad_norm": (("step",), total.astype(np.float32), {"long_name": "total gradient norm (pre-clip)", "units": "1"}),
            "clip_coef": (("step",), clip.astype(np.float32), {"long_name": "clipping coefficient", "units": "1", "formula": "min(1, max_grad_norm / total_grad_norm)"}),
            "post_clip_grad_norm": (("step",), (total * clip).astype(np.float32), {"long_name": "total gradient norm (post-clip)", "units": "1"}),
        },
        coords={
            "step": np.arange(1, S + 1, dtype=np.int64) * every,
            "layer": layer_ids.astype(np.int64),
            "module": list(modules),
            "component": list(components),
        },
    )
    ds["step"].attrs.update(long_name="optimizer step", units="steps")
    ds["layer"].attrs.update(long_name="layer (transformer block)", units="1")
    return ds


def _weight_norm(component, t, method):
    if component == "B" and method not in _NONZERO_INIT:
        return np.where(t <= t.min(), 0.0, 0.05 * np.sqrt(t))  # B starts at zero
    return {"A": 0.5, "B": 0.5, "magnitude": 8.0, "E": 0.1, "ia3": 5.0, "ln": 5.0}[component] + 0 * t


# ------------------------------------------------------------------------------ side files
def _write_metrics(path: Path, rng, steps, every, gradients, final) -> None:
    """metrics.jsonl as the MetricsCallback writes it: TRL's log keys, one line per log."""
    lines = []
    for k in range(steps):
        step = (k + 1) * every
        x = k / max(steps - 1, 1)
        fmt = float(np.clip(1 / (1 + np.exp(-10 * (x - 0.3))) + 0.05 * rng.standard_normal(), 0, 1))
        eq = float(np.clip(0.6 / (1 + np.exp(-8 * (x - 0.6))) + 0.05 * rng.standard_normal(), 0, 1))
        length = float(60 - 25 * x + 3 * rng.standard_normal())
        lines.append(
            {
                "step": step,
                "loss": float(0.01 * rng.standard_normal()),
                "grad_norm": float(gradients.total_grad_norm.values[k]),
                "learning_rate": 5e-4 * (1 - k / steps),
                "num_tokens": float(step * 1024),
                "completions/mean_length": length,
                "completions/min_length": length - 20,
                "completions/max_length": length + 20,
                "completions/clipped_ratio": float(np.clip(0.5 - x, 0, 1)),
                "rewards/format_reward/mean": fmt,
                "rewards/format_reward/std": 0.3,
                "rewards/equation_reward/mean": eq,
                "rewards/equation_reward/std": 0.2,
                "reward": fmt + eq,
                "reward_std": 0.4,
                "frac_reward_zero_std": float(np.clip(1 - x, 0, 1)),
                "kl": float(0.001 * k),
                "entropy": float(1.5 - 0.8 * x),
                "clip_ratio/region_mean": 0.0,
                "epoch": k / steps,
            }
        )
    if final and lines:
        lines.append({"step": steps * every, "train_runtime": 12.3, "train_samples_per_second": 4.5, "train_loss": 0.001, "epoch": 1.0})
    with open(path, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(line) + "\n" for line in lines)


def _write_summaries(out: Path, spectral: xr.Dataset, gradients: xr.Dataset) -> None:
    last = spectral.isel(step=-1)
    summary = {"last_step": int(last.step)}
    for name in ("effective_rank", "condition_number", "vector_norm"):
        if name in last:
            summary[f"mean_{name}"] = float(last[name].mean())
    (out / "spectral_logs" / "spectral_history_summary.json").write_text(json.dumps(summary, indent=2))
    gsum = {
        "last_step": int(gradients.step[-1]),
        "mean_grad_norm": {str(c): float(gradients.grad_norm.sel(component=c).mean()) for c in gradients.component.values},
    }
    (out / "gradient_logs" / "gradient_flow_summary.json").write_text(json.dumps(gsum, indent=2))


def _write_pngs(folder: Path, gradients: xr.Dataset) -> None:
    from perl.viz.static import save_gradient_pngs

    save_gradient_pngs(gradients, folder)

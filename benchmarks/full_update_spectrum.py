"""The spectra of full fine-tuning and HRA updates at Qwen2.5-1.5B shapes: our path against the dense SVD.

One transformer block of Qwen2.5-1.5B's linear shapes (q 1536x1536, k/v 256x1536, o 1536x1536,
gate/up 8960x1536, down 1536x8960), float32 base weights W0 (random), and

- full fine-tuning: ``W_t = W0 + U diag(0.9^i) V^T + noise`` (a decaying update, as learning makes);
  ours: the tracker's top k = 16 values by ``lowrank_singular_values`` (torch.svd_lowrank, float32);
  dense: ``torch.linalg.svdvals(W_t - W0)`` in float64;
- HRA r = 8: ``W0 H`` with H the product of 8 Householder reflections; ours: the factored spectrum
  from discovery's ``[W0 (HQ - Q)] Q^T`` form; dense: ``svdvals(W0 @ H - W0)``, H built as in x in.

Prints per-path times, their ratio and the largest difference relative to sigma_1, on one CPU thread.

    python benchmarks/full_update_spectrum.py [--modules q_proj,down_proj] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch

SHAPES = {
    "q_proj": (1536, 1536),
    "k_proj": (256, 1536),
    "v_proj": (256, 1536),
    "o_proj": (1536, 1536),
    "gate_proj": (8960, 1536),
    "up_proj": (8960, 1536),
    "down_proj": (1536, 8960),
}


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def full_update(w0: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    m, n = w0.shape
    u, _ = torch.linalg.qr(torch.randn(m, 64, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(n, 64, generator=gen))
    update = (u * 1e-2 * 0.9 ** torch.arange(64.0)) @ v.T + 1e-6 * torch.randn(m, n, generator=gen)
    return w0 + update


def hra_factors(w0: torch.Tensor, u: torch.Tensor):
    # the same maths as perl.trackers.discovery.AdapterModule._hra_factors, on plain tensors
    u = u.double() / u.double().norm(dim=0)
    q = torch.linalg.qr(u).Q
    hq = q
    for i in range(u.shape[1] - 1, -1, -1):
        hq = hq - 2.0 * u[:, i : i + 1] @ (u[:, i : i + 1].T @ hq)
    return w0.double() @ (hq - q), q.T


def hra_dense(w0: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    u = u.double() / u.double().norm(dim=0)
    h = torch.eye(u.shape[0], dtype=torch.float64)
    for i in range(u.shape[1]):
        h = h - 2.0 * (h @ u[:, i : i + 1]) @ u[:, i : i + 1].T
    return torch.linalg.svdvals(w0.double() @ h - w0.double())


def main() -> None:
    from perl.trackers.spectral_math import factored_singular_values, lowrank_singular_values

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modules", default=",".join(SHAPES), help="comma separated subset of " + ",".join(SHAPES))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    totals = {"full ours": 0.0, "full dense": 0.0, "hra ours": 0.0, "hra dense": 0.0}
    worst = {"full": 0.0, "hra": 0.0}
    for name in args.modules.split(","):
        m, n = SHAPES[name]
        w0 = torch.randn(m, n, generator=gen) / n**0.5
        wt = full_update(w0, gen)
        ours, t1 = timed(lambda: lowrank_singular_values(wt - w0, 16, niter=6))
        dense, t2 = timed(lambda: torch.linalg.svdvals((wt - w0).double())[:16])
        worst["full"] = max(worst["full"], float((ours - dense).abs().max() / dense[0]))
        totals["full ours"] += t1
        totals["full dense"] += t2
        u = torch.randn(n, 8, generator=gen)
        (b, a), t3 = timed(lambda: hra_factors(w0, u))
        sv, t4 = timed(lambda: factored_singular_values(b, a))
        ref, t5 = timed(lambda: hra_dense(w0, u)[:8])
        worst["hra"] = max(worst["hra"], float((sv - ref).abs().max() / ref[0]))
        totals["hra ours"] += t3 + t4
        totals["hra dense"] += t5
        print(
            f"{name:10s} {m}x{n}: full top-16 {t1:.3f} s vs dense {t2:.2f} s; "
            f"HRA r=8 {t3 + t4:.3f} s vs dense {t5:.2f} s"
        )
    print(
        f"full fine-tuning top-16: ours {totals['full ours']:.2f} s, dense {totals['full dense']:.2f} s, "
        f"ratio {totals['full dense'] / totals['full ours']:.0f}x, max |diff| / sigma_1 = {worst['full']:.1e}"
    )
    print(
        f"HRA r=8 spectrum:        ours {totals['hra ours']:.2f} s, dense {totals['hra dense']:.2f} s, "
        f"ratio {totals['hra dense'] / totals['hra ours']:.0f}x, max |diff| / sigma_1 = {worst['hra']:.1e}"
    )


if __name__ == "__main__":
    main()

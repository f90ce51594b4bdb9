"""Overhead of gradient flow tracking, printed as ratios (no pass/fail: read the numbers).

1. ``qwen15b_logged_step_cost``: one logged step (``log_step`` + ``log_update`` + the store append)
   on the exact LoRA r=16 adapter of Qwen2.5-1.5B (28 blocks, hidden 1536, intermediate 8960, k/v
   256, 7 modules: 392 tensors, 18.5M parameters) with random gradients. The base model is built on
   the meta device, so only the adapter exists in memory. Compared with
   a. one backward pass through those adapters' own compute for a batch of tokens (the part of a
      training step that scales with the adapter; a lower bound on a real step), and
   b. an estimate of the full model's backward pass (4 * 1.54e9 * tokens FLOPs) at this machine's
      measured matmul rate.
2. ``embedded_model_overhead``: wall time per optimizer step of a real Trainer run with
   ``GradientFlowCallback`` at frequency 1 against the same run without it. ``main`` runs it on a
   tiny Qwen2 with a plain Trainer; pass your own trainer factory to measure another setup (e.g.
   GRPO on the embedded countdown-nano model; target < 2 % of step time).

Run: ``python benchmarks/gradient_overhead.py [--threads N]`` (a minute or two on 2 CPU cores).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable

import torch

HIDDEN, INTERMEDIATE, KV, BLOCKS, RANK = 1536, 8960, 256, 28, 16
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _timed(fn: Callable[[], object], repeats: int) -> float:
    """Median wall seconds of ``fn`` over ``repeats`` runs (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def qwen15b_lora_adapter():
    """A peft LoRA r=16 model with Qwen2.5-1.5B's shapes; base weights on meta, adapter on CPU with random grads."""
    import peft
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=151936,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=BLOCKS,
        num_attention_heads=12,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    with torch.device("meta"):
        base = Qwen2ForCausalLM(cfg)
    model = peft.get_peft_model(base, peft.LoraConfig(r=RANK, lora_alpha=32, target_modules=MODULES))
    for name, module in model.named_modules():
        if name.endswith((".lora_A.default", ".lora_B.default")):
            module.to_empty(device="cpu")  # materialise the adapter only; the base stays on meta
    generator = torch.Generator().manual_seed(0)
    for p in model.parameters():
        if p.requires_grad:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
            p.grad = torch.randn(p.shape, generator=generator)
    return model


def qwen15b_logged_step_cost(tokens: int = 128, repeats: int = 3) -> dict:
    """Seconds of one logged step at Qwen2.5-1.5B LoRA r=16 shapes, and the two references."""
    from perl.trackers.gradient import GradientFlowTracker

    model = qwen15b_lora_adapter()
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    with tempfile.TemporaryDirectory() as tmp:
        tracker = GradientFlowTracker(model, log_frequency=1, save_dir=tmp)
        step = [0]
        total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm([p.grad for p in params])))

        def optimizer_stand_in():
            with torch.no_grad():
                torch._foreach_add_(params, [p.grad for p in params], alpha=-1e-6)

        def logged_step():
            step[0] += 1
            tracker.log_step(step[0], total_grad_norm=total, max_grad_norm=1.0)
            optimizer_stand_in()
            tracker.log_update()

        logged = _timed(logged_step, repeats) - _timed(optimizer_stand_in, repeats)
        snapshot = tracker.data.isel(step=[-1])

        def append_only():
            step[0] += 1
            tracker.store.append(snapshot.assign_coords(step=[step[0]]))

        append = _timed(append_only, repeats)

    # adapter-sized compute: forward + backward of x -> (x A^T) B^T for every adapted module
    shapes = {
        "q_proj": (HIDDEN, HIDDEN),
        "k_proj": (HIDDEN, KV),
        "v_proj": (HIDDEN, KV),
        "o_proj": (HIDDEN, HIDDEN),
        "gate_proj": (HIDDEN, INTERMEDIATE),
        "up_proj": (HIDDEN, INTERMEDIATE),
        "down_proj": (INTERMEDIATE, HIDDEN),
    }
    adapters = [
        (torch.randn(RANK, i, requires_grad=True), torch.randn(o, RANK, requires_grad=True))
        for _ in range(BLOCKS)
        for i, o in shapes.values()
    ]
    inputs = {i: torch.randn(tokens, i) for i, _ in shapes.values()}

    def adapter_backward():
        loss = sum(((inputs[a.shape[1]] @ a.T) @ b.T).square().mean() for a, b in adapters)
        loss.backward()

    adapter_bw = _timed(adapter_backward, repeats)

    n = 2048
    x, y = torch.randn(n, n), torch.randn(n, n)
    flops_per_s = 2 * n**3 / _timed(lambda: x @ y, repeats)
    full_backward_estimate = 4 * 1.54e9 * tokens / flops_per_s
    return {
        "adapter_params": n_params,
        "tensors": len(params),
        "tokens": tokens,
        "logged_step_s": logged,
        "store_append_s": append,
        "adapter_backward_s": adapter_bw,
        "matmul_gflops": flops_per_s / 1e9,
        "full_backward_estimate_s": full_backward_estimate,
    }


# ------------------------------------------------------------------------------------ whole training step
def embedded_model_overhead(make_trainer: Callable[[list, str, int], tuple], steps: int = 6, rounds: int = 2) -> dict:
    """Seconds per optimizer step with and without gradient tracking at frequency 1.

    Args:
        make_trainer (callable): ``make_trainer(callbacks, save_dir, steps) -> (trainer, model)`` builds a
            fresh, identically seeded Trainer (any Trainer subclass, e.g. GRPOTrainer on the embedded
            model) with ``max_steps=steps``, the given callbacks and ``model`` the trained (peft) model.
        steps (int, defaults to 6): optimizer steps per run; the first step (warm-up) is not timed.
        rounds (int, defaults to 2): untracked and tracked runs alternate this many times.

    Returns ``{"median": {...}, "min": {...}}`` of per-step seconds and the overhead ratio.
    """
    from transformers import TrainerCallback

    from perl.trackers import GradientFlowCallback, GradientFlowTracker

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self._t = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            self._t = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self._t)

    results = {"untracked": [], "tracked": []}
    for label in ("untracked", "tracked") * rounds:
        with tempfile.TemporaryDirectory() as tmp:
            timer = StepTimer()
            trainer, model = make_trainer([timer], tmp, steps)
            if label == "tracked":
                tracker = GradientFlowTracker(model, log_frequency=1, save_dir=tmp)
                trainer.add_callback(GradientFlowCallback(tracker, trainer=trainer))
            trainer.train()
            results[label].extend(timer.times[1:])
    # on a shared machine the minimum is the least disturbed estimate; the median is printed too
    out = {}
    for stat in ("median", "min"):
        f = statistics.median if stat == "median" else min
        untracked, tracked = f(results["untracked"]), f(results["tracked"])
        out[stat] = {"untracked_step_s": untracked, "tracked_step_s": tracked, "overhead": tracked / untracked - 1}
    return out


def tiny_lora_trainer(callbacks: list, save_dir: str, steps: int):
    """A stand-in workload for ``embedded_model_overhead``: LoRA on a 2-block Qwen2 with a plain Trainer."""
    import peft
    import torch.nn.functional as F
    from torch.utils.data import Dataset
    from transformers import Qwen2Config, Qwen2ForCausalLM, Trainer, TrainingArguments

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = peft.get_peft_model(Qwen2ForCausalLM(cfg), peft.LoraConfig(r=8, target_modules=MODULES))
    rows = torch.randint(0, 512, (64, 64))

    class Rows(Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            return {"input_ids": rows[i]}

    class LMTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            ids = inputs["input_ids"]
            logits = model(input_ids=ids).logits
            return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))

    args = TrainingArguments(
        output_dir=save_dir,
        max_steps=steps,
        per_device_train_batch_size=8,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    return LMTrainer(model=model, args=args, train_dataset=Rows(), callbacks=callbacks), model


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared machine OpenMP barriers, not the work, dominate "
        "multi-threaded timings; use the core count on a dedicated machine)",
    )
    parser.add_argument("--tokens", type=int, default=128, help="tokens of the adapter backward reference")
    parser.add_argument("--skip-trainer", action="store_true", help="skip the whole-step Trainer measurement")
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    torch.manual_seed(0)
    print(f"torch threads: {torch.get_num_threads()}")
    r = qwen15b_logged_step_cost(tokens=options.tokens)
    print(f"Qwen2.5-1.5B LoRA r={RANK}: {r['tensors']} adapter tensors, {r['adapter_params'] / 1e6:.1f}M parameters")
    print(f"  one logged step (norms, copy, update norms, store append): {r['logged_step_s'] * 1e3:8.1f} ms")
    print(f"    of which the netCDF store append:                        {r['store_append_s'] * 1e3:8.1f} ms")
    print(
        f"  adapter-only forward+backward, {r['tokens']} tokens:               {r['adapter_backward_s'] * 1e3:8.1f} ms"
    )
    print(
        f"  full-model backward estimate, {r['tokens']} tokens "
        f"({r['matmul_gflops']:.0f} GFLOP/s):   {r['full_backward_estimate_s'] * 1e3:8.1f} ms"
    )
    print(f"  ratio logged step / adapter backward:      {r['logged_step_s'] / r['adapter_backward_s']:.3f}")
    print(f"  ratio logged step / full backward (est.):  {r['logged_step_s'] / r['full_backward_estimate_s']:.4f}")
    if options.skip_trainer:
        return
    e = embedded_model_overhead(tiny_lora_trainer)
    print(
        "Whole Trainer step, tracking at frequency 1 (tiny 4-block Qwen2 LoRA stand-in; "
        "pass the embedded-model GRPO factory to embedded_model_overhead for the real number):"
    )
    for stat, v in e.items():
        print(
            f"  {stat:6s}: untracked {v['untracked_step_s'] * 1e3:7.1f} ms/step, tracked {v['tracked_step_s'] * 1e3:7.1f} "
            f"ms/step, overhead ratio {v['overhead']:+.3f}"
        )


if __name__ == "__main__":
    main()

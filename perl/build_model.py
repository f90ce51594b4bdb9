"""``perlwb build-model``: rebuild the embedded countdown-nano model from a seed, then evaluate it.

The recipe (tokenizer, traces, training) is `perl.models.nano`; this module is the command on
top of it, which also scores the result with `perl.evaluate` (a higher floor than `perl.models`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from perl.cli_support import OneLineParser, parse_or_fail, positive_int
from perl.models.nano import (
    _OUR_FILES,
    RECIPE_FILE,
    SHIPPED_DIR,
    NanoRecipe,
    build_tokenizer,
    recipe_problems,
    save_model,
    train_model,
    training_problems,
)

__all__ = ["build", "main"]


def _check_output_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"output path {str(out_dir)!r} is a file; pass a directory.")
    if out_dir.is_dir():
        foreign = [p.name for p in out_dir.iterdir() if p.name not in _OUR_FILES]
        if foreign:
            raise ValueError(
                f"output directory {str(out_dir)!r} holds other files ({', '.join(sorted(foreign)[:3])}); "
                "pass an empty or new directory, or an earlier countdown-nano build to overwrite."
            )


def build(
    out_dir: str | Path,
    seed: int = 0,
    quick: bool = False,
    recipe: NanoRecipe | None = None,
    progress: bool = True,
    log=print,
) -> dict:
    """Rebuild countdown-nano from a seed: data, training, saving, evaluation (one after another).

    Args:
        out_dir (`str` or `Path`): where the checkpoint goes (created; an earlier build is overwritten).
        seed (`int`, defaults to 0): the recipe seed.
        quick (`bool`, defaults to False): the small variant of :meth:`NanoRecipe.quick`.
        recipe (`NanoRecipe`, optional): explicit knobs (then ``seed`` and ``quick`` are ignored).
        progress (`bool`, defaults to True): progress bars during the evaluation.
        log (callable, defaults to ``print``): receives one progress line at a time.

    Returns:
        ``{"out_dir", "recipe", "n_params", "eval", "seconds"}``; the same record is saved as
        ``recipe.json`` next to the weights.
    """
    import torch

    from perl.evaluate import evaluate, format_table, run_eval

    out_dir = Path(out_dir)
    _check_output_dir(out_dir)
    if recipe is None:
        recipe = NanoRecipe.quick(seed=seed) if quick else NanoRecipe(seed=seed)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(recipe.threads)
    seconds: dict[str, float] = {}
    try:
        t0 = time.time()
        log(f"[nano] phase 1/4 data: {recipe.n_train_problems} training problems (seed {recipe.seed})")
        tokenizer = build_tokenizer()
        problems = training_problems(recipe)
        eval_problems = recipe_problems(recipe, recipe.eval_n, 3, recipe.seed, "test")
        seconds["data"] = time.time() - t0

        t0 = time.time()
        log(f"[nano] phase 2/4 training: {recipe.steps} steps of {recipe.batch_size} traces")
        model = train_model(recipe, tokenizer, problems, log=log)
        seconds["train"] = time.time() - t0

        t0 = time.time()
        log(f"[nano] phase 3/4 saving to {out_dir}")
        save_model(model, tokenizer, out_dir, recipe)
        seconds["save"] = time.time() - t0

        t0 = time.time()
        log(
            f"[nano] phase 4/4 evaluation: {recipe.eval_n} held-out 3-number problems"
            + (f", {recipe.eval_n_four} 4-number problems" if recipe.eval_n_four else "")
        )
        results = run_eval(
            model,
            tokenizer,
            eval_problems,
            max_new_tokens=recipe.eval_max_new_tokens,
            seed=recipe.seed,
            progress=progress,
        )
        if recipe.eval_n_four:
            four = recipe_problems(recipe, recipe.eval_n_four, 4, recipe.seed, "test")
            results["sample T=1 (4 numbers)"] = evaluate(
                model,
                tokenizer,
                four,
                greedy=False,
                max_new_tokens=recipe.eval_max_new_tokens,
                seed=recipe.seed,
                progress=progress,
            )
        seconds["eval"] = time.time() - t0
    finally:
        torch.set_num_threads(threads_before)
    seconds["total"] = sum(seconds.values())
    record = {
        "out_dir": str(out_dir),
        "recipe": asdict(recipe),
        "n_params": sum(p.numel() for p in model.parameters()),
        "eval": results,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }
    (out_dir / RECIPE_FILE).write_text(json.dumps(record, indent=2) + "\n")
    log(
        f"[nano] done in {seconds['total']:.0f}s (data {seconds['data']:.0f}s, train "
        f"{seconds['train']:.0f}s, eval {seconds['eval']:.0f}s); checkpoint in {out_dir}"
    )
    log(format_table(results))
    return record


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="perlwb build-model",
        description="Rebuild the embedded countdown-nano model from a seed: generate Countdown "
        "problems, train a tiny Qwen2 on solver search traces, save and evaluate it.",
    )
    p.add_argument(
        "name",
        nargs="?",
        default="countdown-nano",
        choices=["countdown-nano"],
        help="the model to build (only countdown-nano)",
    )
    p.add_argument("--seed", type=int, default=0, help="recipe seed (default 0, the shipped checkpoint)")
    p.add_argument(
        "--output-dir",
        default="countdown-nano",
        help=f"where to write the checkpoint (default ./countdown-nano; the shipped copy is {SHIPPED_DIR})",
    )
    p.add_argument(
        "--quick", action="store_true", help="a small, fast variant (about a minute) that learns the format only"
    )
    p.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="torch CPU threads (default 2; on a machine shared with other jobs 1 is often faster)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the evaluation progress bars")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``perlwb build-model countdown-nano [--seed N] [--output-dir D] [--quick]``."""
    from perl.evaluate import prefer_passive_openmp

    prefer_passive_openmp()
    args = parse_or_fail(build_parser(), argv, check=lambda a: _check_output_dir(Path(a.output_dir)))
    if isinstance(args, int):
        return args
    recipe = NanoRecipe.quick(seed=args.seed) if args.quick else NanoRecipe(seed=args.seed)
    if args.threads is not None:
        recipe.threads = args.threads
    build(args.output_dir, recipe=recipe, progress=not args.no_progress, log=lambda line: print(line, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())

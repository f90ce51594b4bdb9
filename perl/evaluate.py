"""Evaluate a model, or a finished run (base model + adapter), on held-out Countdown problems.

The prompt is the training pipeline's (:func:`perl.data.prompt.build_prompt`), the rewards are
the training rewards (:mod:`perl.data.rewards`), and the problems come from the generator's
``test`` partition, which no training set drawn from the ``train`` partition ever contains.

Usage:
    $ perlwb eval countdown-nano --n 500 --output results.json
    $ perlwb eval runs/demo                      # a run folder: config.yaml + adapter_config.json
    $ perlwb eval runs/full                      # a full fine-tuning run: config.yaml + the saved model

    >>> from perl.evaluate import evaluate
    >>> evaluate(model, tokenizer, problems, greedy=False, temperature=1.0)
    {'format_rate': 0.97, 'correct_rate': 0.24, 'mean_completion_tokens': 38.1, 'n': 500, ...}
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from perl.cli_support import OneLineParser, fail, parse_or_fail, positive_int

DEFAULT_MAX_NEW_TOKENS = 64


def prefer_passive_openmp() -> None:
    """Make idle OpenMP threads sleep instead of spin, unless the user chose a policy.

    Effective only before torch is first imported (the OpenMP runtime reads it once). On a CPU
    shared with other jobs, spinning threads fight for the cores: measured on 2 shared cores,
    sampling 128 completions of countdown-nano with 2 threads took 57 s spinning and 1.4 s passive.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def evaluate(
    model,
    tokenizer,
    problems: Sequence[dict],
    greedy: bool,
    temperature: float = 1.0,
    batch_size: int = 64,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    seed: int = 0,
    progress: bool = True,
    desc: str | None = None,
    n_examples: int = 3,
) -> dict:
    """Generate one completion per problem and score it with the training rewards.

    Args:
        model: a causal LM (``transformers`` or a peft wrapper), put in eval mode here.
        tokenizer: its tokenizer; padding is forced to the left for generation.
        problems (`Sequence[dict]`): ``{"nums": [...], "target": int}`` records.
        greedy (`bool`): greedy decoding if True, else sampling at ``temperature``.
        temperature (`float`, defaults to 1.0): sampling temperature (ignored when greedy).
        batch_size (`int`, defaults to 64): prompts per ``generate`` call.
        max_new_tokens (`int`, defaults to 64): completion budget; a cut completion fails the format.
        seed (`int`, defaults to 0): torch seed for sampling.
        progress (`bool`, defaults to True): show a tqdm progress bar.
        desc (`str`, optional): the progress bar's label.
        n_examples (`int`, defaults to 3): how many completions to return as examples.

    Returns:
        ``{"format_rate", "correct_rate", "mean_completion_tokens", "truncated_rate", "n",
        "greedy", "temperature", "max_new_tokens", "examples"}``; rates are in [0, 1].
    """
    import torch
    from tqdm.auto import tqdm

    from perl.data.prompt import build_prompt
    from perl.data.rewards import equation_reward, format_reward

    if not problems:
        raise ValueError("evaluate() got no problems; pass at least one {'nums', 'target'} record.")
    model.eval()
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    fmt, eq, lengths, truncated, examples = [], [], [], [], []
    gen = torch.Generator().manual_seed(seed)
    bar = tqdm(
        total=len(problems),
        desc=desc or ("greedy" if greedy else f"sample T={temperature:g}"),
        disable=not progress,
        leave=False,
    )
    try:
        for start in range(0, len(problems), batch_size):
            batch = list(problems[start : start + batch_size])
            prompts = [build_prompt(p["nums"], p["target"], tokenizer) for p in batch]
            enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id)
            if greedy:
                kwargs.update(do_sample=False)
            else:
                kwargs.update(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
            # note: a private generator per call keeps sampled results independent of other torch use.
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            with torch.no_grad():
                out = model.generate(**enc, **kwargs)
            new = out[:, enc["input_ids"].shape[1] :]
            texts = tokenizer.batch_decode(new, skip_special_tokens=True)
            for row, text in zip(new.tolist(), texts):
                n_tok = len(row)
                ended = tokenizer.eos_token_id in row
                if ended:
                    n_tok = row.index(tokenizer.eos_token_id) + 1
                lengths.append(n_tok)
                truncated.append(not ended)
            fmt += format_reward(texts)
            eq += equation_reward(texts, nums=[p["nums"] for p in batch], target=[p["target"] for p in batch])
            if len(examples) < n_examples:
                examples += [{"prompt": pr, "completion": t} for pr, t in zip(prompts, texts)][
                    : n_examples - len(examples)
                ]
            bar.update(len(batch))
    finally:
        bar.close()
        tokenizer.padding_side = old_side
    n = len(problems)
    return {
        "format_rate": sum(fmt) / n,
        "correct_rate": sum(eq) / n,
        "mean_completion_tokens": sum(lengths) / n,
        "truncated_rate": sum(truncated) / n,
        "n": n,
        "greedy": greedy,
        "temperature": None if greedy else temperature,
        "max_new_tokens": max_new_tokens,
        "examples": examples,
    }


def format_table(results: dict[str, dict]) -> str:
    """A small text table of ``{label: evaluate(...) result}``."""
    lines = [f"{'decoding':<24} {'n':>5} {'format':>8} {'correct':>8} {'tokens':>7} {'cut':>6}"]
    for label, r in results.items():
        lines.append(
            f"{label:<24} {r['n']:>5} {r['format_rate']:>8.1%} {r['correct_rate']:>8.1%} "
            f"{r['mean_completion_tokens']:>7.1f} {r['truncated_rate']:>6.1%}"
        )
    return "\n".join(lines)


def load_for_eval(model_or_run: str):
    """Return ``(model, tokenizer, description)`` for a model name/path or a run folder.

    A run folder holds ``config.yaml`` (its ``model.model_name_or_path`` is the base) and a peft
    adapter (``adapter_config.json``) in the folder itself; a full fine-tuning run (``peft.type:
    full``) holds the whole trained model instead, which is loaded as it is.
    """

    path = Path(model_or_run).expanduser()
    if path.is_dir() and (path / "config.yaml").is_file():
        method = _run_method(path)
        if method == "full":
            # note: a full fine-tuning run saves the whole model (config.json + weights) into its folder
            if not (path / "config.json").is_file():
                raise ValueError(
                    f"full fine-tuning run {str(path)!r} has no saved model (config.json); evaluate "
                    "a finished run or one of its checkpoint-N folders."
                )
            model, tokenizer = _load_base(str(path))
            return model, tokenizer, f"full fine-tuning run {path}"
        if not (path / "adapter_config.json").is_file():
            raise ValueError(
                f"run folder {str(path)!r} has no adapter_config.json; evaluate a finished run "
                "(the adapter is saved at the end of training) or pass a model name."
            )
        from perl.adapters import load_trained_adapter
        from perl.config import ConfigError, load_config

        try:
            config = load_config(path / "config.yaml")
        except ConfigError as exc:
            raise ValueError(f"cannot read the run's config: {exc}") from None
        base = config.model.model_name_or_path
        model, tokenizer = _load_base(str(base))
        # note: PiSSA and MiLoRA moved the base weight; the registry rebuilds that before loading
        model = load_trained_adapter(model, config.peft, path)
        return model, tokenizer, f"{base} + {config.peft.type} adapter {path}"
    model, tokenizer = _load_base(model_or_run)
    return model, tokenizer, str(model_or_run)


def _run_method(path: Path) -> str | None:
    """The ``peft.type`` a run folder's config.yaml names (lower case), None when it cannot be read."""
    from perl.config import ConfigError, load_config

    try:
        return str(load_config(path / "config.yaml").peft.type).lower()
    except ConfigError:
        return None


def _load_base(name: str):
    try:
        from perl.models.loading import load_model_and_tokenizer
    except ImportError:  # pragma: no cover - loading.py is part of the package
        load_model_and_tokenizer = None
    if load_model_and_tokenizer is not None:
        return load_model_and_tokenizer(name, dtype="float32")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (
        AutoModelForCausalLM.from_pretrained(name, local_files_only=True),
        AutoTokenizer.from_pretrained(name, local_files_only=True),
    )


def run_eval(
    model, tokenizer, problems, batch_size=64, max_new_tokens=DEFAULT_MAX_NEW_TOKENS, seed=0, progress=True
) -> dict[str, dict]:
    """Greedy and sampled (temperature 1) evaluation of the same problems."""
    return {
        "greedy": evaluate(
            model,
            tokenizer,
            problems,
            greedy=True,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            seed=seed,
            progress=progress,
        ),
        "sample T=1": evaluate(
            model,
            tokenizer,
            problems,
            greedy=False,
            temperature=1.0,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            seed=seed,
            progress=progress,
        ),
    }


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="perlwb eval",
        description="Evaluate a model or a finished run on held-out Countdown problems "
        "(greedy and sampled at temperature 1).",
    )
    p.add_argument("model", help="countdown-nano, a model directory, a cached hub id, or a run folder")
    p.add_argument("--n", type=positive_int, default=500, help="number of held-out problems (default 500)")
    p.add_argument("--seed", type=int, default=0, help="seed of the problems and of sampling (default 0)")
    p.add_argument("--num-numbers", type=positive_int, default=3, help="numbers per problem (default 3)")
    p.add_argument("--max-number", type=positive_int, default=100, help="largest number in a problem (default 100)")
    p.add_argument("--max-target", type=positive_int, default=1000, help="largest target (default 1000)")
    p.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=DEFAULT_MAX_NEW_TOKENS,
        help=f"completion budget in tokens (default {DEFAULT_MAX_NEW_TOKENS})",
    )
    p.add_argument("--batch-size", type=positive_int, default=64, help="prompts per generate call (default 64)")
    p.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--output", default=None, help="write the results as JSON to this file")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``perlwb eval``: print the evaluation table; exit 2 with one line on stderr on a user error."""
    prefer_passive_openmp()
    parser = build_parser()
    args = parse_or_fail(parser, argv)
    if isinstance(args, int):
        return args
    from perl.data.countdown import generate_problems

    try:
        problems = generate_problems(
            args.n,
            seed=args.seed,
            min_numbers=args.num_numbers,
            max_numbers=args.num_numbers,
            max_number=args.max_number,
            max_target=args.max_target,
            split="test",
        )
        from perl.progress import quiet_known_warnings

        with quiet_known_warnings():
            model, tokenizer, description = load_for_eval(args.model)
    except (ValueError, OSError) as exc:
        return fail(str(exc), prog=parser.prog)
    import torch

    torch.set_num_threads(args.threads)
    results = run_eval(
        model,
        tokenizer,
        problems,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        progress=not args.no_progress,
    )
    print(f"model: {description}")
    print(f"problems: {args.n} held-out, {args.num_numbers} numbers, seed {args.seed}")
    print(format_table(results))
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "model": description,
            "n": args.n,
            "seed": args.seed,
            "num_numbers": args.num_numbers,
            "results": results,
        }
        out.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"results written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The recipe of ``countdown-nano``: a tiny Qwen2 trained from scratch on solver search traces.

``perlwb build-model countdown-nano`` (`perl.build_model`, which runs this recipe) generates Countdown
problems, writes a short search trace for each (:func:`perl.data.countdown.search_trace`), trains a
Qwen2-architecture causal LM on ``prompt -> trace + answer`` with a plain torch loop on the CPU,
evaluates it on held-out problems, and saves safetensors, config and tokenizer files. The phases run
one after another; the same seed gives the same data and the same initialisation.

The tokenizer is built here with the ``tokenizers`` library, no downloads: every integer 0..999 is
one token (longer digit strings split into runs of up to three digits), the four tags and the
prompt's fixed phrases are ordinary tokens (TRL decodes with ``skip_special_tokens=True``), any
other printable ASCII character is its own token, and decoding concatenates tokens, so Countdown
text round-trips exactly. ``<pad>`` is distinct from the eos ``<|endoftext|>``; padding is on the left.

Usage:
    >>> from perl.build_model import build
    >>> from perl.models.nano import load_nano_tokenizer
    >>> record = build("out/countdown-nano", seed=0)          # ~10 minutes on 2 CPU cores
    >>> tokenizer = load_nano_tokenizer("out/countdown-nano")
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

PACKAGE_MODELS = Path(__file__).resolve().parent
SHIPPED_DIR = PACKAGE_MODELS / "countdown_nano"

PAD_TOKEN = "<pad>"
EOS_TOKEN = "<|endoftext|>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS = [PAD_TOKEN, EOS_TOKEN, UNK_TOKEN]
TAG_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]
# note: the plain prompt's fixed phrases as single tokens: every prompt token costs CPU time in RL.
PHRASE_TOKENS = ["Let me solve this step by step.", "numbers:", "target:"]
MAX_NUMBER_TOKEN = 999
CHAR_TOKENS = ["\n", "\t"] + [chr(c) for c in range(32, 127) if not chr(c).isdigit()]
# Tags and phrases first, then a number of at most three digits (no leading zero, so every
# digit string splits into in-vocabulary pieces), then any single character.
_PRETOKENIZE_PATTERN = "|".join(
    [r"</?think>", r"</?answer>"]
    + [p.replace(".", r"\.") for p in PHRASE_TOKENS]
    + [r"0", r"[1-9][0-9]{0,2}", r"[\s\S]"]
)
MODEL_MAX_LENGTH = 512


def nano_vocab() -> dict[str, int]:
    """The token -> id map of the nano tokenizer (ids fixed by construction, not by training)."""
    tokens = SPECIAL_TOKENS + TAG_TOKENS + PHRASE_TOKENS
    tokens += [str(n) for n in range(MAX_NUMBER_TOKEN + 1)] + CHAR_TOKENS
    return {t: i for i, t in enumerate(tokens)}


def build_tokenizer():
    """Build the nano tokenizer as a ``PreTrainedTokenizerFast`` (left padding, pad != eos)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    core = Tokenizer(models.WordLevel(vocab=nano_vocab(), unk_token=UNK_TOKEN))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(_PRETOKENIZE_PATTERN), behavior="isolated")
    # note: Fuse concatenates tokens; the default WordLevel decoding would join them with spaces.
    core.decoder = decoders.Fuse()
    core.add_special_tokens(SPECIAL_TOKENS)
    return _wrap(core)


def _wrap(core):
    from transformers import PreTrainedTokenizerFast

    # note: clean_up_tokenization_spaces would rewrite " ." and the like: never for Countdown text.
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        padding_side="left",
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
    )


def load_nano_tokenizer(path: str | Path):
    """Load the nano tokenizer saved in ``path`` (a folder with ``tokenizer.json``).

    Equivalent to ``PreTrainedTokenizerFast.from_pretrained(path)`` thanks to the shipped
    ``tokenizer_config.json``; this function does not depend on it.
    """
    from tokenizers import Tokenizer

    file = Path(path) / "tokenizer.json"
    if not file.is_file():
        raise FileNotFoundError(f"no tokenizer.json in {str(path)!r}; expected a countdown-nano folder.")
    return _wrap(Tokenizer.from_file(str(file)))


def save_tokenizer(tokenizer, out_dir: str | Path) -> None:
    """Save tokenizer files whose ``tokenizer_class`` keeps AutoTokenizer off Qwen's own class."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out_dir))
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(
        tokenizer_class="PreTrainedTokenizerFast",
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=MODEL_MAX_LENGTH,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
    )
    # note: a qwen2 config.json makes AutoTokenizer force Qwen2Tokenizer, which rebuilds the
    # pipeline and loses spaces and newlines; an auto_map entry opts out of that override, and
    # without trust_remote_code transformers then loads the class named in tokenizer_class.
    cfg["auto_map"] = {"AutoTokenizer": [None, "PreTrainedTokenizerFast"]}
    cfg.pop("chat_template", None)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


# ------------------------------------------------------------------------------------- recipe
@dataclass
class NanoRecipe:
    """Every knob of the countdown-nano recipe; the defaults build the shipped checkpoint.

    Usage:
        >>> build("out/nano", recipe=NanoRecipe(seed=1, steps=2000))
        >>> NanoRecipe.quick()            # the small variant of `--quick`

    Args:
        seed (`int`, defaults to 0): seeds the problems, the traces, the initialisation and the eval.
        n_train_problems (`int`): distinct problems drawn from the generator's train partition.
        four_number_share (`float`): share of training problems with four numbers (the rest three).
        max_number (`int`), max_target (`int`): the generator's ranges (its defaults).
        max_failed (`int`): failed tries per 3-number trace, uniform in 0..max_failed.
        max_failed_four (`int`): the same for 4-number traces (longer lines, so fewer of them).
        hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size (`int`): the Qwen2 shape.
        steps (`int`), batch_size (`int`), learning_rate (`float`), warmup_steps (`int`),
        weight_decay (`float`): the optimisation (AdamW, linear warmup, cosine decay to 10%).
        eval_n (`int`): held-out 3-number problems for the final table (greedy and sampled).
        eval_n_four (`int`): held-out 4-number problems, sampled (0 skips that row).
        eval_max_new_tokens (`int`): completion budget of the evaluation.
        threads (`int`): torch CPU threads.
    """

    seed: int = 0
    n_train_problems: int = 40000
    four_number_share: float = 0.25
    max_number: int = 100
    max_target: int = 1000
    max_failed: int = 2
    max_failed_four: int = 1
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 384
    steps: int = 1200
    batch_size: int = 64
    learning_rate: float = 3e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    eval_n: int = 500
    eval_n_four: int = 200
    eval_max_new_tokens: int = 64
    threads: int = 2
    log_every: int = 100

    @classmethod
    def quick(cls, **overrides) -> NanoRecipe:
        """A small variant (under a minute) for the slow test: it learns the format, not the task."""
        base = dict(
            n_train_problems=3000,
            hidden_size=64,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            intermediate_size=128,
            steps=300,
            batch_size=32,
            eval_n=64,
            eval_n_four=0,
            log_every=50,
        )
        base.update(overrides)
        return cls(**base)


def model_config(recipe: NanoRecipe, tokenizer):
    """The Qwen2 config of the recipe (tied embeddings, float32)."""
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_kv_heads,
        head_dim=recipe.hidden_size // recipe.num_heads,
        max_position_embeddings=MODEL_MAX_LENGTH,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        use_sliding_window=False,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )


def recipe_problems(recipe: NanoRecipe, n: int, numbers: int, seed: int, split: str) -> list[dict]:
    """``n`` problems of exactly ``numbers`` numbers within the recipe's number and target bounds."""
    from perl.data.countdown import generate_problems

    return generate_problems(
        n,
        seed=seed,
        min_numbers=numbers,
        max_numbers=numbers,
        max_number=recipe.max_number,
        max_target=recipe.max_target,
        split=split,
    )


def training_problems(recipe: NanoRecipe) -> list[dict]:
    """The recipe's training problems, all from the generator's train partition."""
    n4 = round(recipe.n_train_problems * recipe.four_number_share)
    problems = recipe_problems(recipe, recipe.n_train_problems - n4, 3, recipe.seed, "train")
    if n4:
        problems += recipe_problems(recipe, n4, 4, recipe.seed + 1, "train")
    return problems


def encode_example(problem: dict, tokenizer, rng: random.Random, max_failed: int) -> tuple[list[int], int]:
    """``(input_ids, prompt_length)`` of one training example with a fresh search trace; ends with eos."""
    from perl.data.countdown import completion_text, search_trace
    from perl.data.prompt import build_prompt

    prompt = build_prompt(problem["nums"], problem["target"], tokenizer)
    thinking, equation = search_trace(problem["nums"], problem["target"], rng, max_failed=max_failed)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion_text(thinking, equation), add_special_tokens=False)["input_ids"]
    return prompt_ids + completion_ids + [tokenizer.eos_token_id], len(prompt_ids)


def collate(examples: Sequence[tuple[list[int], int]], pad_id: int):
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 on prompt and padding)."""
    import torch

    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, n_prompt) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        mask[row, : len(ids)] = 1
        labels[row, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
    return input_ids, mask, labels


def _lr_at(step: int, recipe: NanoRecipe) -> float:
    if step < recipe.warmup_steps:
        return recipe.learning_rate * (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    return recipe.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train_model(recipe: NanoRecipe, tokenizer, problems: Sequence[dict], log=print, on_log=None):
    """Train a fresh Qwen2 on search traces of ``problems``; returns the model (eval mode).

    ``on_log(step, model)``, if given, is called at every log line (e.g. to keep snapshots).
    """
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(recipe.seed)
    model = AutoModelForCausalLM.from_config(model_config(recipe, tokenizer), attn_implementation="sdpa")
    model.float().train()
    n_params = sum(p.numel() for p in model.parameters())
    log(
        f"[nano] model: Qwen2, {recipe.num_layers} layers, hidden {recipe.hidden_size}, "
        f"{n_params / 1e6:.2f}M parameters"
    )
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.learning_rate,
        betas=(0.9, 0.98),
    )
    rng = random.Random(recipe.seed + 12345)
    t0 = time.time()
    running = None
    for step in range(recipe.steps):
        batch = []
        for _ in range(recipe.batch_size):
            problem = rng.choice(problems)
            max_failed = recipe.max_failed if len(problem["nums"]) <= 3 else recipe.max_failed_four
            batch.append(encode_example(problem, tokenizer, rng, max_failed))
        input_ids, mask, labels = collate(batch, tokenizer.pad_token_id)
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, recipe)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if (step + 1) % recipe.log_every == 0 or step + 1 == recipe.steps:
            elapsed = time.time() - t0
            log(
                f"[nano] step {step + 1}/{recipe.steps}  loss {running:.3f}  "
                f"lr {optimizer.param_groups[0]['lr']:.2e}  {elapsed:.0f}s "
                f"({(step + 1) / elapsed:.2f} steps/s)"
            )
            if on_log is not None:
                on_log(step + 1, model)
    model.eval()
    return model


# ---------------------------------------------------------------------------------- build / CLI
RECIPE_FILE = "recipe.json"
_OUR_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    RECIPE_FILE,
}


def save_model(model, tokenizer, out_dir: str | Path, recipe: NanoRecipe) -> None:
    """Write safetensors, config, generation config and tokenizer files to ``out_dir``."""
    from transformers import GenerationConfig

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.eos_token_id,
        max_new_tokens=recipe.eval_max_new_tokens,
    )
    model.save_pretrained(str(out_dir), safe_serialization=True)
    save_tokenizer(tokenizer, out_dir)
    # note: safetensors writes its file owner-only; package data must be readable by every user.
    for file in out_dir.iterdir():
        if file.name in _OUR_FILES:
            file.chmod(0o644)

"""Find and load a causal LM and its tokenizer, without ever downloading.

A model is named in one of four ways:

- ``countdown-nano``: the small Countdown model shipped inside this package (the default);
- ``tiny-random``: a randomly initialised two-block Qwen2 (a config shipped in the package, the
  nano tokenizer); it learns nothing and exists so that tests exercise the real code path fast;
- a local directory holding ``config.json`` and the weights;
- a Hugging Face hub id (``org/name``), used only when its files are already in the local cache.

Everything else is a :class:`ModelNotFound` error that says how to point at a local path.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

PACKAGE_MODELS = Path(__file__).resolve().parent
EMBEDDED_MODELS = {"countdown-nano": PACKAGE_MODELS / "countdown_nano"}
TINY_RANDOM = "tiny-random"
TINY_RANDOM_CONFIG = PACKAGE_MODELS / "configs" / "tiny-qwen2.json"


class ModelNotFound(ValueError):
    """A model name that is neither embedded, a local directory, nor in the local hub cache."""


def resolve_model_path(name: str) -> Path | str:
    """Return where ``name`` lives on disk (or ``"tiny-random"``); raise :class:`ModelNotFound` otherwise.

    Cheap: reads no weights. The CLI calls it to refuse a bad name before anything is written.
    """
    name = str(name).strip()
    if name in EMBEDDED_MODELS:
        path = EMBEDDED_MODELS[name]
        if not (path / "config.json").is_file():
            raise ModelNotFound(
                f"the embedded model {name!r} is missing from the package ({path}); "
                f"rebuild it with `perlwb build-model {name}`"
            )
        return path
    if name == TINY_RANDOM:
        return TINY_RANDOM
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ModelNotFound(f"model path {str(path)!r} is not a model directory (no config.json in it)")
        return path.resolve()
    looks_like_hub_id = name.count("/") == 1 and not name.startswith((".", "/", "~"))
    if looks_like_hub_id:
        cached = _hub_cache_dir(name)
        if cached is not None:
            return cached
        raise ModelNotFound(
            f"model {name!r} is not in the local Hugging Face cache and this workbench never downloads; "
            f"download it once elsewhere (huggingface-cli download {name}) or pass a local directory "
            f"with --config.model.model_name_or_path /path/to/model"
        )
    raise ModelNotFound(
        f"model {name!r} is neither an embedded model ({', '.join([*EMBEDDED_MODELS, TINY_RANDOM])}), "
        f"an existing directory, nor a hub id of the form org/name"
    )


def _hub_cache_dir(repo_id: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # noqa: BLE001 - any failure means "not usable offline"
        return None


def resolve_dtype(dtype: str, device_type: str):
    """Map the config's dtype name to a torch dtype: ``auto`` is float32 on CPU, bfloat16 on GPU."""
    import torch

    if dtype in (None, "auto"):
        return torch.bfloat16 if device_type == "cuda" else torch.float32
    try:
        return {
            "float32": torch.float32,
            "fp32": torch.float32,
            "bfloat16": torch.bfloat16,
            "bf16": torch.bfloat16,
            "float16": torch.float16,
            "fp16": torch.float16,
        }[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; expected auto, float32, bfloat16 or float16") from None


def resolve_attn_implementation(requested: str, device_type: str) -> str:
    """Fall back from flash_attention_2 to sdpa when flash-attn cannot run here, and say so."""
    if requested == "flash_attention_2":
        if device_type != "cuda":
            logger.warning("attn_implementation flash_attention_2 needs a GPU; falling back to sdpa")
            return "sdpa"
        if importlib.util.find_spec("flash_attn") is None:
            logger.warning("attn_implementation flash_attention_2: flash-attn is not installed; falling back to sdpa")
            return "sdpa"
    return requested


def load_tokenizer(name_or_path: str | Path):
    """Load the tokenizer of a model, left-padded for generation, with a pad token.

    A folder whose ``tokenizer_config.json`` names ``PreTrainedTokenizerFast`` is loaded with that class:
    ``AutoTokenizer`` would map a ``qwen2`` config to Qwen's own tokenizer and drop the saved
    normaliser and pre-tokeniser (spaces and newlines would vanish).
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = resolve_model_path(str(name_or_path))
    if path == TINY_RANDOM:
        path = EMBEDDED_MODELS["countdown-nano"]
    path = Path(path)
    tok_cfg = path / "tokenizer_config.json"
    cls_name = None
    if tok_cfg.is_file():
        try:
            cls_name = json.loads(tok_cfg.read_text()).get("tokenizer_class")
        except (OSError, ValueError):
            cls_name = None
    if cls_name == "PreTrainedTokenizerFast":
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path))
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name_or_path: str | Path,
    dtype: str = "auto",
    attn_implementation: str = "sdpa",
    device_type: str | None = None,
    seed: int = 0,
):
    """Load a causal LM by name (see the module docstring); never downloads.

    Args:
        name_or_path (`str`): embedded name, ``tiny-random``, local directory or cached hub id.
        dtype (`str`, defaults to ``"auto"``): ``auto`` (float32 on CPU, bfloat16 on GPU), float32, bfloat16, float16.
        attn_implementation (`str`, defaults to ``"sdpa"``): flash_attention_2 falls back to sdpa when unusable.
        device_type (`str`, *optional*): ``cpu`` or ``cuda``; detected when omitted.
        seed (`int`, defaults to 0): initialisation seed of ``tiny-random``.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = resolve_dtype(dtype, device_type)
    attn = resolve_attn_implementation(attn_implementation, device_type)
    path = resolve_model_path(str(name_or_path))
    if path == TINY_RANDOM:
        config = AutoConfig.from_pretrained(str(TINY_RANDOM_CONFIG))
        config._attn_implementation = attn
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype, attn_implementation=attn)
        return model
    return AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch_dtype, attn_implementation=attn, local_files_only=True
    )


def load_model_and_tokenizer(
    name_or_path: str | Path,
    dtype: str = "auto",
    attn_implementation: str = "sdpa",
    device_type: str | None = None,
    seed: int = 0,
):
    """Return ``(model, tokenizer)`` for ``name_or_path``; see :func:`load_model`."""
    tokenizer = load_tokenizer(name_or_path)
    model = load_model(name_or_path, dtype, attn_implementation, device_type, seed)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer

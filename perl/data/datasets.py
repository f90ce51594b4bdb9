"""Countdown datasets for GRPO: generated offline, read from local files, or from the HF cache.

``load_countdown`` returns train and test ``datasets.Dataset``s with the columns GRPOTrainer and
the rewards need: ``prompt`` (str, from :func:`perl.data.prompt.build_prompt`), ``nums``
(list[int]) and ``target`` (int). TRL passes ``nums`` and ``target`` on to the reward functions.

Sources, by ``dataset_name_or_path``:
- ``"countdown-generated"`` (default): :func:`perl.data.countdown.generate_problems`; train and test
  are drawn from disjoint hash partitions, so no problem is in both.
- a local ``.parquet`` / ``.json`` / ``.jsonl`` file, or a folder of such files (searched
  recursively), with ``nums`` and ``target`` columns;
- a Hugging Face dataset id such as ``Jiayi-Pan/Countdown-Tasks-3to4``, only when its files are in
  the local hub cache: nothing is ever downloaded.

From files, ``example_numbers + test_size`` rows are drawn at random (seeded) and split so that
no problem (numbers as a multiset, and target) is in both train and test.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from perl.data.countdown import generate_problems, train_test_split
from perl.data.prompt import build_prompt

logger = logging.getLogger(__name__)

GENERATED = "countdown-generated"
DATA_SUFFIXES = (".parquet", ".json", ".jsonl")
REQUIRED_COLUMNS = ("nums", "target")


@dataclass
class _Defaults:
    """The values used for fields a ``dataset_cfg`` does not have (the config's own defaults win)."""

    dataset_name_or_path: str = GENERATED
    example_numbers: int | None = 2000
    test_size: int = 100
    min_numbers: int = 3
    max_numbers: int = 4
    max_number: int = 100
    max_target: int = 1000
    seed: int = 42
    max_prompt_length: int | None = None


class DatasetNotFound(ValueError):
    """A dataset name that is neither generated, a local file or folder, nor in the local HF cache."""


class DatasetFormatError(ValueError):
    """A dataset file that cannot be read as Countdown problems (type, columns or values)."""


# ------------------------------------------------------------------------------------ resolving
def _data_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in DATA_SUFFIXES and p.is_file())


def _not_found(name: str, why: str) -> DatasetNotFound:
    return DatasetNotFound(
        f"Dataset '{name}' {why}; pass a local .parquet/.json/.jsonl file or folder with 'nums' and "
        f"'target' columns, or '{GENERATED}' for the offline generator."
    )


def resolve_dataset_source(name: str) -> str:
    """Check cheaply that a dataset is available and say where it is, without reading it.

    Usage:
        >>> resolve_dataset_source("countdown-generated")
        'countdown-generated'
        >>> resolve_dataset_source("data/countdown.jsonl")          # -> absolute path of the file
        >>> resolve_dataset_source("Jiayi-Pan/Countdown-Tasks-3to4")  # -> its cached snapshot folder

    Args:
        name (`str`): ``"countdown-generated"``, a local file or folder, or a hub dataset id.

    Returns:
        ``"countdown-generated"``, or the absolute path of a local file or folder that holds the data
        (for a hub id, the snapshot folder in the local Hugging Face cache).

    Raises:
        DatasetNotFound: the name is none of these, or a hub id that is not in the local cache.
        DatasetFormatError: a local file whose type is not .parquet, .json or .jsonl.
    """
    if not isinstance(name, str) or not name.strip():
        raise _not_found(str(name), "is empty")
    if name == GENERATED:
        return GENERATED
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix.lower() not in DATA_SUFFIXES:
            raise DatasetFormatError(
                f"Dataset file {path} is a '{path.suffix}' file; expected .parquet, .json or .jsonl."
            )
        return str(path.resolve())
    if path.is_dir():
        if not _data_files(path):
            raise _not_found(name, "is a folder without .parquet/.json/.jsonl files")
        return str(path.resolve())
    looks_like_path = path.suffix.lower() in DATA_SUFFIXES or name.startswith((".", "/", "~", "\\"))
    if looks_like_path or name.count("/") > 1:
        raise _not_found(name, "does not exist")
    return _resolve_hub_cache(name)


def _resolve_hub_cache(repo_id: str) -> str:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        # note: local_files_only never touches the network: it reads refs/ and snapshots/ only.
        folder = snapshot_download(repo_id, repo_type="dataset", local_files_only=True)
    except (LocalEntryNotFoundError, HFValidationError, OSError, ValueError):
        raise _not_found(
            repo_id, f"is not a local path and not in the local Hugging Face cache ({constants.HF_HUB_CACHE})"
        ) from None
    if not _data_files(Path(folder)):
        raise _not_found(repo_id, f"is cached at {folder} but has no .parquet/.json/.jsonl files")
    return folder


# ------------------------------------------------------------------------------------- reading
def _read_json_records(path: Path) -> list[dict]:
    """Records of a .jsonl file (one object per line) or a .json file: a list of objects, a dict
    of columns, one object, or JSON lines (what ``Dataset.to_json`` writes, even as .json)."""
    text = path.read_text(encoding="utf-8")
    data: Any = None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None
    if data is None:
        data = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                data.append(json.loads(line))
            except json.JSONDecodeError:
                raise DatasetFormatError(
                    f"Dataset file {path} line {lineno} is not valid JSON; expected one JSON object per line."
                ) from None
    if isinstance(data, dict):
        if data and all(isinstance(v, list) for v in data.values()):  # {"nums": [...], "target": [...]}
            n = min(len(v) for v in data.values())
            data = [{k: v[i] for k, v in data.items()} for i in range(n)]
        else:
            data = [data]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DatasetFormatError(
            f"Dataset file {path} is not a list of JSON objects; expected records with 'nums' and 'target'."
        )
    return data


def _read_table(path: Path):
    """One data file as a pyarrow Table of the required columns, or a clear error."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if path.suffix.lower() == ".parquet":
            columns = pq.read_schema(path).names
            _check_columns(path, columns)
            return pq.read_table(path, columns=list(REQUIRED_COLUMNS))
        records = _read_json_records(path)
    except (OSError, UnicodeDecodeError, pa.ArrowException) as err:
        raise DatasetFormatError(f"Dataset file {path} could not be read ({err}).") from None
    columns = sorted({k for r in records for k in r}) if records else []
    _check_columns(path, columns)
    try:
        return pa.Table.from_pylist([{c: r.get(c) for c in REQUIRED_COLUMNS} for r in records])
    except (pa.ArrowException, TypeError, ValueError) as err:
        raise DatasetFormatError(
            f"Dataset file {path} has 'nums'/'target' values of mixed types ({err}); "
            "expected a list of integers and an integer."
        ) from None


def _check_columns(path: Path, columns: list[str]) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise DatasetFormatError(
            f"Dataset file {path} has columns {list(columns)} but lacks {missing}; "
            "expected 'nums' (list of integers) and 'target' (integer)."
        )


def _as_problem(source: str, nums: Any, target: Any) -> dict:
    """Validate one row: nums a non-empty list of integers, target an integer."""
    try:
        ok = isinstance(nums, (list, tuple)) and len(nums) > 0
        ints = [int(n) for n in nums] if ok else []
        ok = ok and all(not isinstance(n, bool) and float(n) == i for n, i in zip(nums, ints))
        tgt = int(target)
        ok = ok and not isinstance(target, bool) and float(target) == tgt
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        raise DatasetFormatError(
            f"Dataset {source} has a row with nums={nums!r}, target={target!r}; "
            "expected a non-empty list of integers and an integer."
        )
    return {"nums": ints, "target": tgt}


def _load_problems(source: str, n_train: int | None, test_size: int, seed: int) -> tuple[list, list]:
    """Read every data file of ``source``, draw the rows to use, split train/test disjointly."""
    import numpy as np
    import pyarrow as pa

    path = Path(source)
    files = [path] if path.is_file() else _data_files(path)
    tables = [_read_table(f) for f in files]
    try:
        table = pa.concat_tables(tables, promote_options="permissive")
    except pa.ArrowException as err:
        raise DatasetFormatError(
            f"Dataset files under {source} have incompatible 'nums'/'target' types ({err})."
        ) from None
    total = table.num_rows
    wanted = total if n_train is None else min(total, n_train + test_size)
    if n_train is not None and total < n_train + test_size:
        logger.warning(
            "Dataset %s has %d rows, fewer than example_numbers + test_size = %d; using all of them.",
            source,
            total,
            n_train + test_size,
        )
    order = np.random.default_rng(seed).permutation(total)[:wanted]
    rows = table.take(pa.array(order, type=pa.int64())).to_pylist()
    problems = [_as_problem(source, r["nums"], r["target"]) for r in rows]
    if test_size > len(problems):
        raise ValueError(
            f"Dataset {source} has {len(problems)} rows, fewer than test_size={test_size}; "
            "lower test_size or use a larger dataset."
        )
    return train_test_split(problems, test_size, seed)


# ------------------------------------------------------------------------------------- building
def _to_dataset(problems: list[dict], tokenizer):
    import datasets

    features = datasets.Features(
        {
            "prompt": datasets.Value("string"),
            "nums": datasets.List(datasets.Value("int64")),
            "target": datasets.Value("int64"),
        }
    )
    return datasets.Dataset.from_dict(
        {
            "prompt": [build_prompt(p["nums"], p["target"], tokenizer) for p in problems],
            "nums": [list(p["nums"]) for p in problems],
            "target": [int(p["target"]) for p in problems],
        },
        features=features,
    )


def _drop_long_prompts(ds, tokenizer, max_prompt_length: int, split: str):
    # note: counted exactly as GRPOTrainer tokenizes prompts (`processing_class(text=prompts)`,
    # special tokens included), so a kept prompt is never longer than the limit inside TRL.
    lengths = [len(ids) for ids in tokenizer(list(ds["prompt"]))["input_ids"]]
    keep = [i for i, n in enumerate(lengths) if n <= max_prompt_length]
    dropped = len(lengths) - len(keep)
    if dropped:
        logger.warning(
            "Dropped %d of %d %s prompts longer than max_prompt_length=%d tokens (longest: %d).",
            dropped,
            len(lengths),
            split,
            max_prompt_length,
            max(lengths),
        )
    if lengths and not keep:
        raise ValueError(
            f"Every {split} prompt is longer than max_prompt_length={max_prompt_length} tokens "
            f"(the shortest has {min(lengths)}); raise max_prompt_length or set it to None."
        )
    return ds.select(keep) if dropped else ds


def load_countdown(dataset_cfg, tokenizer=None, max_prompt_length: int | None = None):
    """Build the Countdown train and test datasets described by ``dataset_cfg``.

    Usage:
        >>> train_ds, test_ds = load_countdown(config.dataset, tokenizer)
        >>> train_ds[0]
        {'prompt': 'numbers: 3 5 7 target: 22\\nLet me solve this step by step.\\n<think>', 'nums': [3, 5, 7], 'target': 22}

    Args:
        dataset_cfg: an object with (any of) the fields ``dataset_name_or_path`` (str, defaults to
            ``"countdown-generated"``), ``example_numbers`` (int: training examples, defaults to
            2000; ``None`` for every row of a file), ``test_size`` (int, defaults to 100),
            ``min_numbers`` (3), ``max_numbers`` (4), ``max_number`` (100), ``max_target``
            (1000) for the generator, ``seed`` (42), and ``max_prompt_length`` (int or ``None``:
            prompts with more tokens are dropped, and the count is logged).
        tokenizer (optional): chooses the prompt template (see ``build_prompt``) and counts tokens.
        max_prompt_length (`int`, optional): overrides ``dataset_cfg.max_prompt_length`` (the
            training section of ``TrainConfig`` owns this knob; trl 1.16 no longer has it).

    Returns:
        ``(train, test)``: ``datasets.Dataset``s with columns ``prompt``, ``nums``, ``target``.

    Raises:
        DatasetNotFound, DatasetFormatError (both `ValueError`): the source is missing or malformed.
    """
    defaults = _Defaults()
    cfg = {f: getattr(dataset_cfg, f, getattr(defaults, f)) for f in (x.name for x in fields(defaults))}
    n_train, test_size, seed = cfg["example_numbers"], int(cfg["test_size"]), int(cfg["seed"])
    if n_train is not None and int(n_train) < 1:
        raise ValueError(f"example_numbers must be a positive number of problems, got {n_train}.")
    if test_size < 0:
        raise ValueError(f"test_size must be a count of problems >= 0, got {test_size}.")
    source = resolve_dataset_source(cfg["dataset_name_or_path"])
    if source == GENERATED:
        gen = {k: int(cfg[k]) for k in ("min_numbers", "max_numbers", "max_number", "max_target")}
        n_train = int(n_train) if n_train is not None else _Defaults.example_numbers
        train = generate_problems(n_train, seed, split="train", **gen)
        test = generate_problems(test_size, seed, split="test", **gen)
    else:
        train, test = _load_problems(source, None if n_train is None else int(n_train), test_size, seed)
    logger.info("Countdown data from %s: %d train, %d test problems.", source, len(train), len(test))
    train_ds, test_ds = _to_dataset(train, tokenizer), _to_dataset(test, tokenizer)
    max_len = max_prompt_length if max_prompt_length is not None else cfg["max_prompt_length"]
    if max_len is not None:
        if tokenizer is None:
            raise ValueError("max_prompt_length needs the tokenizer to count prompt tokens; pass it.")
        train_ds = _drop_long_prompts(train_ds, tokenizer, int(max_len), "train")
        test_ds = _drop_long_prompts(test_ds, tokenizer, int(max_len), "test")
    return train_ds, test_ds

"""Countdown datasets: generated, local files, the local HF cache, clear errors, prompt filtering."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import PreTrainedTokenizerFast

from perl.data.countdown import problem_key
from perl.data.datasets import (
    GENERATED,
    DatasetFormatError,
    DatasetNotFound,
    load_countdown,
    resolve_dataset_source,
)
from perl.data.prompt import build_prompt


@pytest.fixture(scope="module")
def tokenizer():
    """One token per whitespace-separated word, so a prompt's length is ``len(prompt.split())``."""
    vocab = {"[UNK]": 0, "numbers:": 1, "target:": 2, "<think>": 3}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[UNK]")


def cfg(**fields):
    return SimpleNamespace(**fields)


def rows_of(ds) -> list[tuple[tuple[int, ...], int]]:
    return [(tuple(r["nums"]), r["target"]) for r in ds]


def problems(n: int, start: int = 0) -> list[dict]:
    """Distinct problems; their values need not be solvable for the loader."""
    return [{"nums": [i % 97 + 1, i // 97 + 1, 5], "target": 100 + i} for i in range(start, start + n)]


def check_columns(ds, tokenizer):
    assert ds.column_names == ["prompt", "nums", "target"]
    for r in ds:
        assert isinstance(r["target"], int) and all(isinstance(n, int) for n in r["nums"])
        assert r["prompt"] == build_prompt(r["nums"], r["target"], tokenizer)


# ----------------------------------------------------------------------------------- generated
def test_generated_is_the_default(tokenizer):
    train, test = load_countdown(cfg(example_numbers=30, test_size=8, seed=1), tokenizer)
    assert (len(train), len(test)) == (30, 8)
    check_columns(train, tokenizer)
    check_columns(test, tokenizer)
    assert train[0]["prompt"].endswith("Let me solve this step by step.\n<think>")
    train_keys = {problem_key(n, t) for n, t in rows_of(train)}
    assert not train_keys & {problem_key(n, t) for n, t in rows_of(test)}
    # deterministic for a seed, different for another
    again, _ = load_countdown(cfg(example_numbers=30, test_size=8, seed=1), tokenizer)
    other, _ = load_countdown(cfg(example_numbers=30, test_size=8, seed=2), tokenizer)
    assert rows_of(again) == rows_of(train) and rows_of(other) != rows_of(train)


def test_generator_knobs_reach_the_generator(tokenizer):
    c = cfg(
        dataset_name_or_path=GENERATED,
        example_numbers=20,
        test_size=0,
        seed=0,
        min_numbers=4,
        max_numbers=4,
        max_number=9,
        max_target=30,
    )
    train, test = load_countdown(c, tokenizer)
    assert len(train) == 20 and len(test) == 0
    for nums, target in rows_of(train):
        assert len(nums) == 4 and all(1 <= n <= 9 for n in nums) and 1 <= target <= 30


def test_chat_template_tokenizer_gets_chat_prompts(tokenizer):
    chat = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, unk_token="[UNK]")
    chat.chat_template = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
    train, _ = load_countdown(cfg(example_numbers=3, test_size=1), chat)
    assert train[0]["prompt"].startswith("<|system|>") and train[0]["prompt"].endswith("<think>")
    check_columns(train, chat)


# --------------------------------------------------------------------------------- local files
def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_local_jsonl(tmp_path, tokenizer):
    records = problems(40)
    path = tmp_path / "countdown.jsonl"
    write_jsonl(path, records)
    train, test = load_countdown(cfg(dataset_name_or_path=str(path), example_numbers=25, test_size=10), tokenizer)
    assert (len(train), len(test)) == (25, 10)
    check_columns(train, tokenizer)
    everything = {(tuple(r["nums"]), r["target"]) for r in records}
    assert set(rows_of(train)) <= everything and set(rows_of(test)) <= everything
    assert not set(rows_of(train)) & set(rows_of(test))


def test_local_json_array_and_example_numbers_none(tmp_path, tokenizer):
    records = problems(12)
    path = tmp_path / "countdown.json"
    path.write_text(json.dumps(records))
    train, test = load_countdown(cfg(dataset_name_or_path=str(path), example_numbers=None, test_size=2), tokenizer)
    assert sorted(rows_of(train) + rows_of(test)) == sorted((tuple(r["nums"]), r["target"]) for r in records)


def test_other_json_shapes(tmp_path, tokenizer):
    one = tmp_path / "one.jsonl"
    one.write_text('{"nums": [3, 5, 7], "target": 22}')
    train, _ = load_countdown(cfg(dataset_name_or_path=str(one), test_size=0), tokenizer)
    assert rows_of(train) == [((3, 5, 7), 22)]
    columns = tmp_path / "columns.json"
    columns.write_text(json.dumps({"nums": [[3, 5, 7], [1, 2, 3]], "target": [22, 6]}))
    train, _ = load_countdown(cfg(dataset_name_or_path=str(columns), test_size=0), tokenizer)
    assert sorted(rows_of(train)) == [((1, 2, 3), 6), ((3, 5, 7), 22)]


def test_duplicates_never_straddle_train_and_test(tmp_path, tokenizer):
    records = problems(15) * 3
    path = tmp_path / "dups.jsonl"
    write_jsonl(path, records)
    for seed in range(5):
        train, test = load_countdown(
            cfg(dataset_name_or_path=str(path), example_numbers=30, test_size=5, seed=seed), tokenizer
        )
        assert len(test) >= 5 and len(train) + len(test) == 35
        assert not set(rows_of(train)) & set(rows_of(test))


def test_local_parquet_and_folder(tmp_path, tokenizer):
    a, b = problems(10), problems(10, start=10)
    (tmp_path / "data").mkdir()
    pq.write_table(pa.Table.from_pylist(a), tmp_path / "data" / "train-0.parquet")
    # a second file with narrower integer types and an extra column, as real exports have
    extra = pa.table(
        {
            "target": pa.array([r["target"] for r in b], pa.int32()),
            "nums": pa.array([r["nums"] for r in b], pa.list_(pa.int16())),
            "source": ["x"] * 10,
        }
    )
    pq.write_table(extra, tmp_path / "data" / "train-1.parquet")
    one, _ = load_countdown(
        cfg(dataset_name_or_path=str(tmp_path / "data" / "train-0.parquet"), example_numbers=10, test_size=0),
        tokenizer,
    )
    assert sorted(rows_of(one)) == sorted((tuple(r["nums"]), r["target"]) for r in a)
    train, test = load_countdown(cfg(dataset_name_or_path=str(tmp_path), example_numbers=15, test_size=5), tokenizer)
    assert (len(train), len(test)) == (15, 5)
    assert sorted(rows_of(train) + rows_of(test)) == sorted((tuple(r["nums"]), r["target"]) for r in a + b)
    check_columns(test, tokenizer)


def test_hub_id_from_the_local_cache(tmp_path, tokenizer, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "datasets--Jiayi-Pan--Countdown-Tasks-3to4"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    data = repo / "snapshots" / commit / "data"
    data.mkdir(parents=True)
    records = problems(30)
    pq.write_table(pa.Table.from_pylist(records), data / "train-00000-of-00001.parquet")
    (data.parent / "README.md").write_text("# card")

    name = "Jiayi-Pan/Countdown-Tasks-3to4"
    assert resolve_dataset_source(name) == str((repo / "snapshots" / commit).resolve())
    train, test = load_countdown(cfg(dataset_name_or_path=name, example_numbers=20, test_size=5), tokenizer)
    assert (len(train), len(test)) == (20, 5)
    assert set(rows_of(train)) <= {(tuple(r["nums"]), r["target"]) for r in records}


# -------------------------------------------------------------------------------------- errors
def test_missing_hub_id_gives_a_clear_error(tmp_path, tokenizer, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(DatasetNotFound) as err:
        load_countdown(cfg(dataset_name_or_path="Jiayi-Pan/Countdown-Tasks-3to4"), tokenizer)
    message = str(err.value)
    assert "Jiayi-Pan/Countdown-Tasks-3to4" in message and "local" in message and "\n" not in message
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize("name", ["missing/countdown.jsonl", "./nope.parquet", "/no/such/folder", "a/b/c", ""])
def test_missing_local_paths(name, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DatasetNotFound, match="pass a local"):
        resolve_dataset_source(name)


def test_resolve_dataset_source(tmp_path):
    assert resolve_dataset_source(GENERATED) == GENERATED
    path = tmp_path / "x.jsonl"
    write_jsonl(path, problems(2))
    assert resolve_dataset_source(str(path)) == str(path.resolve())
    assert resolve_dataset_source(str(tmp_path)) == str(tmp_path.resolve())
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFound, match="without .parquet"):
        resolve_dataset_source(str(tmp_path / "empty"))
    (tmp_path / "data.csv").write_text("nums,target\n")
    with pytest.raises(DatasetFormatError, match="expected .parquet, .json or .jsonl"):
        resolve_dataset_source(str(tmp_path / "data.csv"))


def test_bad_columns_name_the_file_and_the_columns(tmp_path, tokenizer):
    path = tmp_path / "bad.jsonl"
    write_jsonl(path, [{"numbers": [1, 2, 3], "answer": 6}] * 3)
    with pytest.raises(DatasetFormatError) as err:
        load_countdown(cfg(dataset_name_or_path=str(path), test_size=1), tokenizer)
    assert str(path) in str(err.value) and "'numbers'" in str(err.value) and "'target'" in str(err.value)

    ppath = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"nums": [[1, 2]], "goal": [3]}), ppath)
    with pytest.raises(DatasetFormatError, match=r"has columns \['nums', 'goal'\] but lacks \['target'\]"):
        load_countdown(cfg(dataset_name_or_path=str(ppath), test_size=0), tokenizer)


@pytest.mark.parametrize(
    "text",
    [
        '{"nums": [1, 2], "target": 3}\n{"nums": "1 2 3", "target": 6}\n',  # a string, not a list
        '{"nums": [1, 2.5], "target": 6}\n',  # not integers
        '{"nums": [1, 2], "target": null}\n',  # no target
        '{"nums": [], "target": 3}',  # no numbers
        '{"nums": [1, 2], "target": 3}\n{oops\n',  # not JSON
        "[1, 2, 3]",  # not records
    ],
)
def test_bad_values_are_a_clear_error(tmp_path, tokenizer, text):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(DatasetFormatError, match="bad.json"):
        load_countdown(cfg(dataset_name_or_path=str(path), test_size=0), tokenizer)


def test_test_size_larger_than_the_file(tmp_path, tokenizer):
    path = tmp_path / "small.jsonl"
    write_jsonl(path, problems(3))
    with pytest.raises(ValueError, match="fewer than test_size=5"):
        load_countdown(cfg(dataset_name_or_path=str(path), test_size=5), tokenizer)


# ------------------------------------------------------------------------- max_prompt_length
def test_max_prompt_length_drops_long_prompts(tmp_path, tokenizer, caplog):
    records = problems(20) + [{"nums": [1, 2, 3, 4], "target": 900 + i} for i in range(10)]
    path = tmp_path / "mixed.jsonl"
    write_jsonl(path, records)
    base = dict(dataset_name_or_path=str(path), example_numbers=24, test_size=6, seed=5)
    full_train, full_test = load_countdown(cfg(**base), tokenizer)
    # independent count: the word count of each prompt (the test tokenizer is one token per word)
    limit = len(build_prompt([1, 2, 3], 100, tokenizer).split())
    assert len(build_prompt([1, 2, 3, 4], 100, tokenizer).split()) == limit + 1
    want_train = [r for r in rows_of(full_train) if len(r[0]) == 3]
    want_test = [r for r in rows_of(full_test) if len(r[0]) == 3]
    assert 0 < len(want_train) < len(full_train)

    with caplog.at_level(logging.INFO, logger="perl.data.datasets"):
        train, test = load_countdown(cfg(**base, max_prompt_length=limit), tokenizer)
    assert rows_of(train) == want_train and rows_of(test) == want_test
    dropped = len(full_train) - len(want_train)
    assert f"Dropped {dropped} of {len(full_train)} train prompts" in caplog.text

    kept_all, _ = load_countdown(cfg(**base, max_prompt_length=limit + 1), tokenizer)
    assert rows_of(kept_all) == rows_of(full_train)
    with pytest.raises(ValueError, match="Every train prompt is longer than max_prompt_length"):
        load_countdown(cfg(**base, max_prompt_length=limit - 1), tokenizer)

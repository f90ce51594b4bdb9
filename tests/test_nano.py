"""The embedded countdown-nano model: the shipped checkpoint, its tokenizer, and the recipe."""

import json
import random
import re

import pytest
import torch

from perl import build_model
from perl.data.countdown import completion_text, generate_problems, search_trace
from perl.data.prompt import build_prompt
from perl.models import nano

SHIPPED = nano.SHIPPED_DIR
# written out here rather than imported from perl.data.rewards, so the test is independent of it
FORMAT = re.compile(r"<think>[^<]*</think>\n<answer>[0-9+\-*/() ]+</answer>")
TAGS = ["<think>", "</think>", "<answer>", "</answer>"]


def countdown_texts(n=60):
    rng = random.Random(0)
    problems = generate_problems(n, seed=7, min_numbers=3, max_numbers=4)
    texts = []
    for p in problems:
        thinking, equation = search_trace(p["nums"], p["target"], rng)
        texts.append(build_prompt(p["nums"], p["target"]) + completion_text(thinking, equation))
    return texts


def tokenizers_to_check():
    from transformers import AutoTokenizer

    from perl.models.loading import load_tokenizer

    return {
        "load_nano_tokenizer": nano.load_nano_tokenizer(SHIPPED),
        "loading.load_tokenizer": load_tokenizer("countdown-nano"),
        # the pitfall: a qwen2 config.json would make AutoTokenizer pick Qwen2Tokenizer
        "AutoTokenizer": AutoTokenizer.from_pretrained(str(SHIPPED), local_files_only=True),
    }


@pytest.mark.parametrize("which", ["load_nano_tokenizer", "loading.load_tokenizer", "AutoTokenizer"])
def test_shipped_tokenizer_round_trips_countdown_text(which):
    tok = tokenizers_to_check()[which]
    texts = countdown_texts() + ["numbers: 3 5 7 target: 22\n  spaces\tand\n\nnewlines 1000 007 (1+2)/3"]
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids
        # TRL decodes with skip_special_tokens=True: the tags must survive it
        assert tok.decode(ids, skip_special_tokens=True) == text
    # numbers below 1000 are single tokens, so traces stay short
    assert len(tok("15+7=22", add_special_tokens=False)["input_ids"]) == 5
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    assert tok.padding_side == "left"
    for tag in TAGS:
        (tag_id,) = tok(tag, add_special_tokens=False)["input_ids"]
        assert tag_id not in tok.all_special_ids


def test_shipped_checkpoint_is_a_small_qwen2():
    config = json.loads((SHIPPED / "config.json").read_text())
    assert config["model_type"] == "qwen2"
    total = sum(f.stat().st_size for f in SHIPPED.iterdir() if f.is_file())
    assert total <= 20 * 2**20
    from perl.models.loading import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer("countdown-nano")
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= names
    assert model.config.vocab_size == len(tok)
    n_params = sum(p.numel() for p in model.parameters())
    assert 0.5e6 <= n_params <= 5e6
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_shipped_checkpoint_generates_the_format_greedily():
    from perl.models.loading import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer("countdown-nano")
    model.eval()
    problems = [
        {"nums": [3, 5, 7], "target": 22},
        {"nums": [44, 19, 35], "target": 98},
        {"nums": [2, 61, 9], "target": 131},
    ]
    prompts = [build_prompt(p["nums"], p["target"], tok) for p in problems]
    assert prompts[0] == "numbers: 3 5 7 target: 22\nLet me solve this step by step.\n<think>"
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(
            **enc, do_sample=False, max_new_tokens=64, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id
        )
    batch_texts = tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    for prompt, text in zip(prompts, batch_texts):
        assert FORMAT.fullmatch("<think>" + text), text
        # left padding in a batch must not change what the model writes for a prompt
        single = tok(prompt, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            alone = model.generate(
                **single,
                do_sample=False,
                max_new_tokens=64,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
        assert tok.decode(alone[0, single["input_ids"].shape[1] :], skip_special_tokens=True) == text


def test_tiny_random_config_matches_the_tokenizer():
    config = json.loads((nano.PACKAGE_MODELS / "configs" / "tiny-qwen2.json").read_text())
    tok = nano.load_nano_tokenizer(SHIPPED)
    assert config["vocab_size"] == len(tok)
    assert (
        config["num_hidden_layers"],
        config["hidden_size"],
        config["num_attention_heads"],
        config["num_key_value_heads"],
        config["intermediate_size"],
    ) == (2, 64, 4, 2, 128)
    assert config["pad_token_id"] == tok.pad_token_id and config["eos_token_id"] == tok.eos_token_id


def test_build_refuses_a_foreign_output_dir(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert build_model.main(["countdown-nano", "--output-dir", str(tmp_path), "--quick"]) == 2
    err = capsys.readouterr().err
    assert "holds other files" in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.slow
def test_quick_recipe_learns_the_format(tmp_path):
    out = tmp_path / "nano-quick"
    assert (
        build_model.main(
            ["countdown-nano", "--quick", "--seed", "1", "--output-dir", str(out), "--no-progress", "--threads", "1"]
        )
        == 0
    )
    record = json.loads((out / "recipe.json").read_text())
    assert record["eval"]["greedy"]["format_rate"] >= 0.8
    # the recipe reproduces its checkpoint from the seed, bit for bit
    again = tmp_path / "nano-quick-again"
    assert (
        build_model.main(
            ["countdown-nano", "--quick", "--seed", "1", "--output-dir", str(again), "--no-progress", "--threads", "1"]
        )
        == 0
    )
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    # the saved folder is a loadable model whose greedy output has the format
    from perl.evaluate import evaluate
    from perl.models.loading import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(str(out))
    problems = generate_problems(32, seed=3, min_numbers=3, max_numbers=3, split="test")
    result = evaluate(model, tok, problems, greedy=True, progress=False)
    assert result["format_rate"] >= 0.8
    assert sum(f.stat().st_size for f in out.iterdir()) <= 20 * 2**20


# ----------------------------------------------------------------------------------- perlwb eval
def independent_score(text, nums, target):
    """(format ok, equation correct) of one completion, computed without perl.data.rewards."""
    import ast
    from collections import Counter
    from fractions import Fraction

    full = "<think>" + text
    if not re.fullmatch(r"<think>((?!</?think>)[\s\S])*</think>\n<answer>[\s\S]*?</answer>", full):
        return False, False
    answer = full[full.rindex("<answer>") + 8 : full.rindex("</answer>")]
    if not re.fullmatch(r"[0-9+\-*/() ]+", answer):
        return True, False
    try:
        tree = ast.parse(answer, mode="eval")
    except SyntaxError:
        return True, False
    used = Counter()

    def walk(node):
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.BinOp):
            a, b = walk(node.left), walk(node.right)
            op = type(node.op)
            if op is ast.Div and b == 0:
                raise ZeroDivisionError
            return {ast.Add: lambda: a + b, ast.Sub: lambda: a - b, ast.Mult: lambda: a * b, ast.Div: lambda: a / b}[
                op
            ]()
        if isinstance(node, ast.Constant) and type(node.value) is int:
            used[node.value] += 1
            return Fraction(node.value)
        raise ValueError(ast.dump(node))

    try:
        value = walk(tree)
    except (ValueError, KeyError, ZeroDivisionError):
        return True, False
    return True, value == target and used == Counter(nums)


def test_evaluate_matches_an_independent_scoring():
    from perl.evaluate import evaluate
    from perl.models.loading import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer("countdown-nano")
    problems = generate_problems(24, seed=4, min_numbers=3, max_numbers=3, split="test")
    result = evaluate(model, tok, problems, greedy=True, batch_size=7, progress=False, n_examples=24)
    fmt = correct = tokens = 0
    for p, example in zip(problems, result["examples"]):
        enc = tok(build_prompt(p["nums"], p["target"], tok), return_tensors="pt")
        with torch.no_grad():
            out = model.generate(
                **enc, do_sample=False, max_new_tokens=64, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id
            )
        new = out[0, enc["input_ids"].shape[1] :].tolist()
        text = tok.decode(new, skip_special_tokens=True)
        assert example["completion"] == text
        ok_format, ok_eq = independent_score(text, p["nums"], p["target"])
        fmt += ok_format
        correct += ok_eq
        tokens += new.index(tok.eos_token_id) + 1 if tok.eos_token_id in new else len(new)
    assert result["n"] == 24
    assert result["format_rate"] == pytest.approx(fmt / 24)
    assert result["correct_rate"] == pytest.approx(correct / 24)
    assert result["mean_completion_tokens"] == pytest.approx(tokens / 24)
    assert fmt > 12, "the shipped model writes the format on most held-out problems"


def test_eval_cli_on_a_run_folder_with_an_adapter(tmp_path, capsys):
    from peft import LoraConfig, get_peft_model

    from perl.evaluate import main
    from perl.models.loading import load_model

    run = tmp_path / "run"
    run.mkdir()
    # the config training would have written for this adapter: eval rebuilds the adapter from it
    (run / "config.yaml").write_text(
        "model:\n  model_name_or_path: countdown-nano\n"
        "peft:\n  type: lora\n  r: 4\n  lora_alpha: 64\n  target_modules: [q_proj, v_proj, down_proj]\n"
    )
    torch.manual_seed(0)
    # init_lora_weights=False: a random, non-zero update, so the adapter visibly changes the model
    peft_model = get_peft_model(
        load_model("countdown-nano"),
        LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False),
    )
    peft_model.save_pretrained(str(run))
    assert (
        main([str(run), "--n", "12", "--output", str(tmp_path / "run.json"), "--no-progress", "--threads", "1"]) == 0
    )
    assert (
        main(
            ["countdown-nano", "--n", "12", "--output", str(tmp_path / "base.json"), "--no-progress", "--threads", "1"]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "adapter" in printed and "sample T=1" in printed
    adapted = json.loads((tmp_path / "run.json").read_text())["results"]
    base = json.loads((tmp_path / "base.json").read_text())["results"]
    assert set(adapted) == {"greedy", "sample T=1"}
    assert adapted["greedy"]["n"] == 12 and 0.0 <= adapted["greedy"]["format_rate"] <= 1.0
    assert [e["completion"] for e in adapted["greedy"]["examples"]] != [
        e["completion"] for e in base["greedy"]["examples"]
    ]


def test_eval_cli_refuses_bad_input(tmp_path, capsys):
    from perl.evaluate import main

    assert main([str(tmp_path / "missing"), "--n", "4"]) == 2
    (tmp_path / "config.yaml").write_text("model:\n  model_name_or_path: countdown-nano\n")
    assert main([str(tmp_path), "--n", "4"]) == 2
    assert main(["countdown-nano", "--n", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "adapter_config.json" in err[1] and "--n" in err[2]

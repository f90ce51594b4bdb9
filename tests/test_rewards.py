"""Countdown rewards: a table of hand-written completions (correct, wrong, malicious) and the
safe evaluator checked against Python's own float arithmetic."""

from __future__ import annotations

import random

import pytest

from perl.data import rewards
from perl.data.countdown import completion_text, generate_problems, search_trace, solve
from perl.data.rewards import MAX_DEPTH, MAX_EXPR_LENGTH, equation_reward, format_reward, safe_eval

OK = " 3*5=15 15+7=22 </think>\n<answer>"  # a well-formed reasoning block, then the answer opens
N = [3, 5, 7]
MB = 1_000_000

# (id, completion, nums, target, expected format reward, expected equation reward)
CASES = [
    ("correct", OK + "3 * 5 + 7</answer>", N, 22, 1.0, 1.0),
    ("correct_parens", OK + "(3 + 5) * 7</answer>", N, 56, 1.0, 1.0),
    ("correct_solver_style", OK + "(3*5)+7</answer>", N, 22, 1.0, 1.0),
    ("correct_other_order", OK + "7 + 5 * 3</answer>", N, 22, 1.0, 1.0),
    ("correct_whitespace_in_answer", OK + "\n 3 * 5 + 7 \n</answer>", N, 22, 1.0, 1.0),
    ("float_within_tolerance", OK + "1 / 49 * 49</answer>", [1, 49, 49], 1, 1.0, 1.0),
    ("fractional_intermediate", OK + "(7 / 2) * 4 - 6</answer>", [2, 4, 6, 7], 8, 1.0, 1.0),
    ("unary_minus", OK + "-5 + 3 + 7</answer>", [5, 3, 7], 5, 1.0, 1.0),
    ("leading_zero_is_the_number", OK + "03 * 5 + 7</answer>", N, 22, 1.0, 1.0),
    ("lone_lt_in_think", " 3 < 5 so 3*5+7 </think>\n<answer>3*5+7</answer>", N, 22, 1.0, 1.0),
    ("wrong_value", OK + "3 * 5 - 7</answer>", N, 22, 1.0, 0.0),
    ("number_reused", OK + "3 * 5 + 7 + 7 - 7</answer>", N, 22, 1.0, 0.0),
    ("number_missing", OK + "3 * 5 + 7</answer>", [3, 5, 7, 1], 22, 1.0, 0.0),
    ("number_not_given", OK + "15 + 7</answer>", N, 22, 1.0, 0.0),
    ("decimal_built_from_digits", OK + "20 / 2.5</answer>", [2, 5, 20], 8, 1.0, 0.0),
    ("decimal_literal", OK + "3.0 * 5 + 7</answer>", N, 22, 1.0, 0.0),
    ("equals_sign", OK + "3 * 5 + 7 = 22</answer>", N, 22, 1.0, 0.0),
    ("extra_text_after_answer", OK + "3 * 5 + 7</answer> done", N, 22, 0.0, 1.0),
    ("newline_after_answer", OK + "3 * 5 + 7</answer>\n", N, 22, 0.0, 1.0),
    ("missing_think_close", " 3*5+7\n<answer>3*5+7</answer>", N, 22, 0.0, 1.0),
    ("no_newline_before_answer", " x </think><answer>3*5+7</answer>", N, 22, 0.0, 1.0),
    ("missing_answer_tags", " x </think>\n3*5+7", N, 22, 0.0, 0.0),
    ("missing_answer_close", OK + "3*5+7", N, 22, 0.0, 0.0),
    ("nested_think", " a <think> b </think>\n<answer>3*5+7</answer>", N, 22, 0.0, 1.0),
    ("nested_answer", OK + "<answer>3*5+7</answer></answer>", N, 22, 1.0, 0.0),
    ("last_answer_counts_correct", OK + "1+1</answer> <answer>3*5+7</answer>", N, 22, 1.0, 1.0),
    ("last_answer_counts_wrong", OK + "3*5+7</answer> <answer>3*5-7</answer>", N, 22, 1.0, 0.0),
    ("empty_answer", OK + "</answer>", N, 22, 1.0, 0.0),
    ("empty_completion", "", N, 22, 0.0, 0.0),
    ("power", OK + "3 ** 5 + 7</answer>", N, 22, 1.0, 0.0),
    ("power_tower", OK + "9**9**9</answer>", [9, 9, 9], 22, 1.0, 0.0),
    ("floor_division", OK + "7 // 3 * 5</answer>", N, 10, 1.0, 0.0),
    ("huge_product", OK + "*".join(["99999999"] * 8) + "</answer>", [99999999] * 8, 1, 1.0, 0.0),
    ("huge_literal", OK + "9" * 20 + " - " + "9" * 20 + "</answer>", [int("9" * 20)] * 2, 0, 1.0, 0.0),
    ("deep_parens_10000", OK + "(" * 10_000 + "3*5+7" + ")" * 10_000 + "</answer>", N, 22, 1.0, 0.0),
    ("deep_parens_short", OK + "(" * (MAX_DEPTH + 1) + "3*5+7" + ")" * (MAX_DEPTH + 1) + "</answer>", N, 22, 1.0, 0.0),
    ("parens_within_depth", OK + "(" * 10 + "3*5+7" + ")" * 10 + "</answer>", N, 22, 1.0, 1.0),
    ("unbalanced_parens", OK + "(3*5+7</answer>", N, 22, 1.0, 0.0),
    ("division_by_zero", OK + "3 / (5 - 5)</answer>", [3, 5, 5], 0, 1.0, 0.0),
    ("letters", OK + "3 * 5 + seven</answer>", N, 22, 1.0, 0.0),
    ("scientific_notation", OK + "3e0 * 5 + 7</answer>", N, 22, 1.0, 0.0),
    ("hex_literal", OK + "0x3 * 5 + 7</answer>", N, 22, 1.0, 0.0),
    ("dunder_import", OK + "__import__('os').system('true')</answer>", N, 22, 1.0, 0.0),
    ("python_conditional", OK + "3*5+7 if 1 else 0</answer>", N, 22, 1.0, 0.0),
    ("list_literal", OK + "[3, 5, 7]</answer>", N, 22, 1.0, 0.0),
    ("fullwidth_digits", OK + "\uff13 * \uff15 + \uff17</answer>", N, 22, 1.0, 0.0),
    ("arabic_indic_digits", OK + "\u0663 * \u0665 + \u0667</answer>", N, 22, 1.0, 0.0),
    ("one_mb_garbage", "a" * MB, N, 22, 0.0, 0.0),
    ("one_mb_of_lt", "<" * MB, N, 22, 0.0, 0.0),
    ("one_mb_think_then_correct", "x" * MB + "</think>\n<answer>3*5+7</answer>", N, 22, 1.0, 1.0),
    ("one_mb_answer", OK + "1+" * (MB // 2) + "1</answer>", [1] * (MB // 2 + 1), MB // 2 + 1, 1.0, 0.0),
    ("one_mb_of_answer_tags", "</think>\n" + "<answer>" * (MB // 8) + "</answer>", N, 22, 1.0, 0.0),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_reward_table(case):
    _, completion, nums, target, want_format, want_equation = case
    assert format_reward([completion]) == [want_format]
    assert equation_reward([completion], nums=[nums], target=[target]) == [want_equation]


def test_table_is_large_and_mixed():
    assert len(CASES) >= 30
    assert {c[5] for c in CASES} == {0.0, 1.0} and {c[4] for c in CASES} == {0.0, 1.0}


def test_batch_follows_trl_signature():
    """A batch with TRL's extra keyword arguments, string and conversational completions."""
    completions = [c[1] for c in CASES]
    nums = [c[2] for c in CASES]
    target = [c[3] for c in CASES]
    extras = dict(
        prompts=["p"] * len(CASES),
        completion_ids=[[1]] * len(CASES),
        trainer_state=None,
        log_extra=None,
        log_metric=None,
    )
    assert format_reward(completions, nums=nums, target=target, **extras) == [c[4] for c in CASES]
    assert equation_reward(completions, nums=nums, target=target, **extras) == [c[5] for c in CASES]
    conversational = [[{"role": "assistant", "content": c}] for c in completions]
    assert format_reward(conversational) == [c[4] for c in CASES]
    assert equation_reward(conversational, nums=nums, target=target) == [c[5] for c in CASES]


def test_solver_equations_and_traces_earn_full_reward():
    """Independent source of truth: the exact-arithmetic solver of perl.data.countdown."""
    rng = random.Random(0)
    for p in generate_problems(25, seed=3):
        nums, target = p["nums"], p["target"]
        thinking, equation = search_trace(nums, target, rng)
        for eq in (equation, solve(nums, target)):
            text = completion_text(thinking, eq)
            assert format_reward([text]) == [1.0]
            assert equation_reward([text], nums=[nums], target=[target]) == [1.0]
            assert equation_reward([text], nums=[nums], target=[target + 1]) == [0.0]
            assert equation_reward([text], nums=[nums + [1]], target=[target]) == [0.0]


# ------------------------------------------------------------------------------------ safe_eval
@pytest.mark.parametrize(
    "expr, value",
    [
        ("1 + 2 * 3", 7.0),
        ("(1 + 2) * 3", 9.0),
        ("8 - 3 - 2", 3.0),  # left associative
        ("12 / 3 / 2", 2.0),  # left associative
        ("2 * 3 + 4 * 5", 26.0),
        ("10 - 4 / 2", 8.0),
        ("-3 * -2", 6.0),
        ("--3", 3.0),
        ("+3 - -2", 5.0),
        ("7 / 2", 3.5),
        (" 1.5 + .5 ", 2.0),
        ("3.", 3.0),
        ("((((2))))", 2.0),
        ("1\t+\n2", 3.0),
        ("100 * 1000 * 1000 * 1000 * 10000", 1e15),  # exactly at the magnitude bound
    ],
)
def test_safe_eval_values(expr, value):
    assert safe_eval(expr) == value


@pytest.mark.parametrize(
    "expr",
    [
        "",
        "   ",
        "()",
        "1 2",
        "1 +",
        "* 2",
        "2 ** 3",
        "2 // 3",
        "1 / 0",
        "1 / (2 - 2)",
        "1.2.3",
        "1..2",
        "abs(1)",
        "x",
        "1e3",
        "1_000",
        "0x10",
        "(1",
        "1)",
        "[1]",
        "'1'",
        "True",
        "100 * 1000 * 1000 * 1000 * 10001",
        "-100 * 1000 * 1000 * 1000 * 10001",
        "9" * 20,
        "1" + " " * MAX_EXPR_LENGTH,
        "\uff11 + 1",
        "1 + 1;",
        "1 = 1",
        None,
        12,
        b"1+1",
    ],
)
def test_safe_eval_rejects(expr):
    assert safe_eval(expr) is None


def test_safe_eval_bounds_are_exact():
    assert safe_eval("1+" * ((MAX_EXPR_LENGTH - 1) // 2) + "1") == (MAX_EXPR_LENGTH - 1) // 2 + 1
    assert safe_eval("1+" * ((MAX_EXPR_LENGTH + 1) // 2) + "1") is None
    assert safe_eval("(" * MAX_DEPTH + "1" + ")" * MAX_DEPTH) == 1.0
    assert safe_eval("(" * (MAX_DEPTH + 1) + "1" + ")" * (MAX_DEPTH + 1)) is None
    assert safe_eval("-" * MAX_DEPTH + "1") == (-1.0) ** MAX_DEPTH
    assert safe_eval("-" * (MAX_DEPTH + 1) + "1") is None
    assert safe_eval("(" * 10_000 + "1" + ")" * 10_000) is None


def _random_tree_valued(rng: random.Random, leaves: int) -> tuple[str, float | None]:
    """A random fully parenthesised expression and its value by Python's float arithmetic,
    computed while it is built (``None`` where a division by zero occurs)."""
    if leaves == 1:
        n = rng.randint(0, 100)
        neg = rng.random() < 0.1
        return (f"-{n}" if neg else str(n)), (-float(n) if neg else float(n))
    k = rng.randint(1, leaves - 1)
    (ls, lv), (rs, rv) = _random_tree_valued(rng, k), _random_tree_valued(rng, leaves - k)
    op = rng.choice("+-*/")
    sp = rng.choice(["", " ", "  "])
    text = f"({ls}{sp}{op}{sp}{rs})"
    if lv is None or rv is None:
        return text, None
    value = {
        "+": lambda: lv + rv,
        "-": lambda: lv - rv,
        "*": lambda: lv * rv,
        "/": lambda: None if rv == 0 else lv / rv,
    }[op]()
    return text, value


def test_safe_eval_matches_python_float_arithmetic():
    rng = random.Random(1234)
    checked = 0
    for _ in range(2000):
        leaves = rng.randint(1, 6)
        text, value = _random_tree_valued(rng, leaves)
        got = safe_eval(text)
        if value is None:
            assert got is None, text
        else:
            assert got == value, text
            checked += 1
    assert checked > 1500


def test_safe_eval_never_raises_on_random_text():
    rng = random.Random(7)
    alphabet = "0123456789+-*/(). \n*xé\u0663"
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        got = safe_eval(text)
        assert got is None or (isinstance(got, float) and abs(got) <= rewards.MAX_MAGNITUDE)

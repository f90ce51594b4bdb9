"""The offline Countdown generator, solver and search traces, checked against independent code.

The independent checks here share nothing with perl.data.countdown: reachability is computed by
enumerating postfix (RPN) programs, and equations are evaluated through Python's ``ast`` with exact
fractions (a test-only evaluator of trusted, generated strings).
"""

import ast
import itertools
import random
import re
from collections import Counter
from fractions import Fraction

import pytest

from perl.data.countdown import (
    completion_text,
    generate_problems,
    problem_key,
    search_trace,
    solve,
    train_test_split,
)

OPS = "+-*/"


def rpn_values(nums):
    """Every value reachable with all ``nums`` once each, by brute force over postfix programs."""
    values = set()
    n = len(nums)
    for perm in set(itertools.permutations(nums)):
        for ops in itertools.product(OPS, repeat=n - 1):
            # a valid postfix program: operand count always exceeds operators applied so far
            for slots in itertools.combinations(range(1, 2 * n - 1), n - 1):
                program, ni, oi = [], 0, 0
                for pos in range(2 * n - 1):
                    if pos in slots:
                        program.append(ops[oi])
                        oi += 1
                    else:
                        program.append(perm[ni])
                        ni += 1
                stack, ok = [], True
                for tok in program:
                    if isinstance(tok, int):
                        stack.append(Fraction(tok))
                        continue
                    if len(stack) < 2:
                        ok = False
                        break
                    b, a = stack.pop(), stack.pop()
                    if tok == "/" and b == 0:
                        ok = False
                        break
                    stack.append({"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else 0}[tok])
                if ok and len(stack) == 1:
                    values.add(stack[0])
    return values


def ast_value(equation: str) -> tuple[Fraction, Counter]:
    """Exact value of an equation of integers, + - * / and parentheses, and the integers it uses."""
    used = Counter()

    def walk(node):
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.BinOp) and type(node.op) in (ast.Add, ast.Sub, ast.Mult, ast.Div):
            a, b = walk(node.left), walk(node.right)
            return {ast.Add: a + b, ast.Sub: a - b, ast.Mult: a * b, ast.Div: a / b}[type(node.op)]
        if isinstance(node, ast.Constant) and type(node.value) is int:
            used[node.value] += 1
            return Fraction(node.value)
        raise AssertionError(f"unexpected syntax in {equation!r}: {ast.dump(node)}")

    return walk(ast.parse(equation, mode="eval")), used


def check_equation(equation, nums, target):
    value, used = ast_value(equation)
    assert value == target, (equation, value, target)
    assert used == Counter(nums), (equation, nums)


# ------------------------------------------------------------------------------------- solver
@pytest.mark.parametrize("seed", range(4))
def test_solver_agrees_with_independent_brute_force(seed):
    rng = random.Random(seed)
    checked_solvable = checked_unsolvable = 0
    for _ in range(40):
        nums = [rng.randint(1, 13) for _ in range(rng.choice([2, 3, 3, 4]))]
        reachable = rpn_values(nums)
        for target in rng.sample(range(0, 60), 6):
            eq = solve(nums, target)
            if Fraction(target) in reachable:
                assert eq is not None, (nums, target)
                check_equation(eq, nums, target)
                checked_solvable += 1
            else:
                assert eq is None, (nums, target, eq)
                checked_unsolvable += 1
    assert checked_solvable > 20 and checked_unsolvable > 20


def test_solver_known_cases():
    check_equation(solve([3, 5, 7], 22), [3, 5, 7], 22)
    assert solve([1, 1, 1], 100) is None
    # every number must be used: 2 + 3 = 5, but 100 cannot be absorbed
    assert solve([2, 3, 100], 5) is None
    # a solution that needs a fraction on the way: 6 / (1 - 3/4) = 24
    check_equation(solve([1, 3, 4, 6], 24), [1, 3, 4, 6], 24)
    check_equation(solve([7], 7), [7], 7)
    with pytest.raises(ValueError, match="1 to 6 numbers"):
        solve(list(range(1, 8)), 10)


# ---------------------------------------------------------------------------------- generator
def test_generator_is_deterministic_and_seeded():
    a = generate_problems(200, seed=3)
    assert a == generate_problems(200, seed=3)
    assert a != generate_problems(200, seed=4)
    # asking for more problems extends, rather than reshuffles, the same stream
    assert generate_problems(300, seed=3)[:200] == a


def test_generated_problems_are_solvable_and_in_range():
    problems = generate_problems(60, seed=1, min_numbers=3, max_numbers=4, max_number=30, max_target=200)
    counts = Counter(len(p["nums"]) for p in problems)
    assert set(counts) == {3, 4}
    keys = set()
    for p in problems:
        assert all(1 <= n <= 30 for n in p["nums"])
        assert 1 <= p["target"] <= 200
        assert Fraction(p["target"]) in rpn_values(p["nums"]), p
        keys.add(problem_key(p["nums"], p["target"]))
    assert len(keys) == len(problems), "problems are distinct"


def test_split_partitions_are_disjoint_across_seeds():
    train = generate_problems(1500, seed=0, min_numbers=3, max_numbers=3, split="train")
    test = generate_problems(300, seed=0, min_numbers=3, max_numbers=3, split="test")
    test_other_seed = generate_problems(300, seed=9, min_numbers=3, max_numbers=3, split="test")
    train_keys = {problem_key(p["nums"], p["target"]) for p in train}
    for p in test + test_other_seed:
        assert problem_key(p["nums"], p["target"]) not in train_keys
        # permuting the numbers does not move a problem into the other partition
        assert problem_key(list(reversed(p["nums"])), p["target"]) not in train_keys
    # the test partition is about test_fraction (10%) of an unfiltered stream
    stream = generate_problems(2000, seed=5, min_numbers=3, max_numbers=3)
    test_keys_all = {
        problem_key(p["nums"], p["target"])
        for p in generate_problems(400, seed=5, min_numbers=3, max_numbers=3, split="test")
    }
    in_test = sum(problem_key(p["nums"], p["target"]) in test_keys_all for p in stream)
    assert 0.05 * len(stream) < in_test < 0.15 * len(stream)


def test_generator_rejects_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        generate_problems(5, seed=0, split="validation")
    with pytest.raises(ValueError, match="min_numbers"):
        generate_problems(5, seed=0, min_numbers=4, max_numbers=3)
    with pytest.raises(ValueError, match="could only generate"):
        generate_problems(50, seed=0, min_numbers=2, max_numbers=2, max_number=2, max_target=5)


def test_train_test_split_is_disjoint_and_groups_duplicates():
    problems = generate_problems(100, seed=2, min_numbers=3, max_numbers=3)
    problems = problems + [dict(problems[0], nums=list(reversed(problems[0]["nums"])))]
    train, test = train_test_split(problems, test_size=0.2, seed=0)
    assert len(train) + len(test) == len(problems)
    train_keys = {problem_key(p["nums"], p["target"]) for p in train}
    test_keys = {problem_key(p["nums"], p["target"]) for p in test}
    assert not train_keys & test_keys
    assert len(test_keys) == 20
    assert train_test_split(problems, 10, seed=1) == train_test_split(problems, 10, seed=1)
    with pytest.raises(ValueError):
        train_test_split(problems, 1.5, seed=0)


# ------------------------------------------------------------------------------ search traces
STEP = re.compile(r"^(\d+)([-+*/])(\d+)=(\d+)$")


def replay_line(line, nums):
    """Check every step of a trace line independently; return the line's final value."""
    pool = Counter(nums)
    value = None
    for step in line.split(" "):
        m = STEP.match(step)
        assert m, f"malformed step {step!r} in {line!r}"
        a, op, b, r = int(m[1]), m[2], int(m[3]), int(m[4])
        exact = {"+": a + b, "-": a - b, "*": a * b, "/": Fraction(a, b)}[op]
        assert exact == r and r > 0, f"wrong arithmetic in {step!r}"
        for operand in (a, b):
            assert pool[operand] > 0, f"{operand} not available in {line!r} ({nums})"
            pool[operand] -= 1
        pool[r] += 1
        value = r
    assert sum(pool.values()) == 1, f"line {line!r} does not use every number of {nums}"
    return value


@pytest.mark.parametrize("num_numbers", [3, 4])
def test_search_traces_are_correct(num_numbers):
    problems = generate_problems(40, seed=11, min_numbers=num_numbers, max_numbers=num_numbers)
    rng = random.Random(0)
    n_failed_seen = Counter()
    for p in problems:
        thinking, equation = search_trace(p["nums"], p["target"], rng, max_failed=3)
        lines = thinking.split("\n")
        assert 1 <= len(lines) <= 4
        n_failed_seen[len(lines) - 1] += 1
        values = [replay_line(line, p["nums"]) for line in lines]
        assert values[-1] == p["target"]
        assert all(v != p["target"] for v in values[:-1])
        check_equation(equation, p["nums"], p["target"])
        assert completion_text(thinking, equation) == f"{thinking}</think>\n<answer>{equation}</answer>"
    assert len(n_failed_seen) >= 3, "the number of failed tries varies"


def test_search_trace_is_deterministic_and_rejects_unsolvable():
    a = search_trace([25, 4, 9, 3], 97, random.Random(5))
    assert a == search_trace([25, 4, 9, 3], 97, random.Random(5))
    # only reachable through a fraction: the trace falls back to the solver's equation
    thinking, equation = search_trace([1, 3, 4, 6], 24, random.Random(0))
    check_equation(equation, [1, 3, 4, 6], 24)
    with pytest.raises(ValueError, match="no solution"):
        search_trace([1, 1, 1], 100, random.Random(0))

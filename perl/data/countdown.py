"""Countdown, offline: a generator of solvable problems, a brute-force solver, solver search traces.

The task is the one of ``Jiayi-Pan/Countdown-Tasks-3to4``: given numbers and a target, write an
equation with + - * / and parentheses that uses every number exactly once and equals the target.

Usage:
    >>> from perl.data.countdown import generate_problems, solve, search_trace
    >>> problems = generate_problems(1000, seed=0, split="train")   # never overlaps split="test"
    >>> solve([3, 5, 7], 22)
    '(3*5)+7'
    >>> import random
    >>> search_trace([3, 5, 7], 22, random.Random(0))   # (thinking text, equation)

Conventions:
- ``solve`` searches every expression tree with exact rational arithmetic (negative and fractional
  intermediate values allowed, as the reward's evaluator allows them).
- Generated problems and search traces use the stricter classic rules (every intermediate value a
  positive integer), so every generated problem has a solution a tiny model can write step by step.
- ``split="train"`` / ``split="test"`` assigns each problem to a partition by a hash of its numbers
  (as a multiset) and target, so the partitions are disjoint for every seed and every size.
"""

from __future__ import annotations

import hashlib
import itertools
import random
from collections.abc import Iterator, Sequence
from fractions import Fraction

# note: the search grows as n! * 6^(n-1); six numbers is ~10^7 trees, the most a caller should ask.
MAX_SOLVER_NUMBERS = 6
TEST_FRACTION = 0.1
SPLITS = ("train", "test")


# --------------------------------------------------------------------------------------- solver
def _combine(a: Fraction, b: Fraction) -> Iterator[tuple[Fraction, str, bool]]:
    """Yield ``(value, op, swapped)`` for every way to combine ``a`` and ``b``."""
    yield a + b, "+", False
    yield a * b, "*", False
    yield a - b, "-", False
    yield b - a, "-", True
    if b != 0:
        yield a / b, "/", False
    if a != 0:
        yield b / a, "/", True


def _solve_items(items: list[tuple[Fraction, str]], target: Fraction) -> str | None:
    if len(items) == 1:
        return items[0][1] if items[0][0] == target else None
    for i, j in itertools.combinations(range(len(items)), 2):
        (va, ea), (vb, eb) = items[i], items[j]
        rest = [items[k] for k in range(len(items)) if k not in (i, j)]
        for value, op, swapped in _combine(va, vb):
            left, right = (eb, ea) if swapped else (ea, eb)
            expr = f"{left}{op}{right}"
            found = _solve_items([(value, f"({expr})" if rest else expr)] + rest, target)
            if found is not None:
                return found
    return None


def solve(nums: Sequence[int], target: int) -> str | None:
    """Return an equation that uses every number of ``nums`` exactly once and equals ``target``.

    Brute force over every expression tree with + - * / and exact rational arithmetic. The equation
    is compact (no spaces) with parentheses around every inner operation, e.g. ``"(3*5)+7"``.

    Args:
        nums (`Sequence[int]`): 1 to 6 integers.
        target (`int`): the value to reach.

    Returns:
        The equation string, or ``None`` when no equation reaches the target.
    """
    nums = [int(n) for n in nums]
    if not 1 <= len(nums) <= MAX_SOLVER_NUMBERS:
        raise ValueError(f"solve() got {len(nums)} numbers; it handles 1 to {MAX_SOLVER_NUMBERS} numbers.")
    items = [(Fraction(n), str(n)) for n in nums]
    return _solve_items(items, Fraction(int(target)))


# ------------------------------------------------------------------ classic (integer) search paths
# A path is the list of steps (a, op, b, result) a person would write, every value a positive
# integer, together with the fully parenthesised equation it amounts to.
Step = tuple[int, str, int, int]


def _integer_ops(a: int, b: int) -> Iterator[tuple[bool, str, int]]:
    """Yield ``(swapped, op, result)`` with a positive integer result for a pair of values.

    ``swapped`` means the step is written ``b op a`` (larger minus smaller, exact division).
    """
    yield False, "+", a + b
    yield False, "*", a * b
    if a != b:
        yield a < b, "-", abs(a - b)
    if b > 0 and a % b == 0:
        yield False, "/", a // b
    if a > 0 and b % a == 0 and a != b:
        yield True, "/", b // a


def integer_paths(nums: Sequence[int]) -> Iterator[tuple[list[Step], str, int]]:
    """Yield every ``(steps, equation, value)`` that combines all ``nums`` with positive integers.

    Args:
        nums (`Sequence[int]`): positive integers (intended for 2 to 5 of them).
    """

    def walk(items: list[tuple[int, str]], steps: list[Step]):
        if len(items) == 1:
            yield steps, items[0][1], items[0][0]
            return
        for i, j in itertools.combinations(range(len(items)), 2):
            rest = [items[k] for k in range(len(items)) if k not in (i, j)]
            (va, ea), (vb, eb) = items[i], items[j]
            for swapped, op, value in _integer_ops(va, vb):
                (lv, le), (rv, re_) = ((vb, eb), (va, ea)) if swapped else ((va, ea), (vb, eb))
                expr = f"{le}{op}{re_}"
                new_items = [(value, f"({expr})" if rest else expr)] + rest
                yield from walk(new_items, steps + [(lv, op, rv, value)])

    yield from walk([(int(n), str(int(n))) for n in nums], [])


def format_steps(steps: Sequence[Step]) -> str:
    """One line of a search trace, e.g. ``"3*5=15 15+7=22"``."""
    return " ".join(f"{a}{op}{b}={r}" for a, op, b, r in steps)


def search_trace(
    nums: Sequence[int],
    target: int,
    rng: random.Random,
    max_failed: int = 3,
    max_value: int = 999,
) -> tuple[str, str]:
    """A short solver search trace: a few tries that fail, then the one that works.

    Each try is one line that combines all the numbers step by step (``"3+5=8 8*7=56"``); the last
    line reaches the target. Training completions are
    ``f"{thinking}</think>\\n<answer>{equation}</answer>"`` (the prompt ends with ``<think>``).

    Args:
        nums (`Sequence[int]`): the problem's numbers.
        target (`int`): the problem's target.
        rng (`random.Random`): chooses the solution and the failed tries (seeded by the caller).
        max_failed (`int`, defaults to 3): the number of failed tries is uniform in 0..max_failed.
        max_value (`int`, defaults to 999): failed tries prefer intermediate values up to this.

    Returns:
        ``(thinking_text, equation)``. A problem with only non-integer or negative solutions gets
        the solver's equation as a one-line trace.

    Raises:
        ValueError: when the problem has no solution at all.
    """
    target = int(target)
    paths = list(integer_paths(nums))
    wins = [p for p in paths if p[2] == target]
    if not wins:
        equation = solve(nums, target)
        if equation is None:
            raise ValueError(f"Countdown problem {list(nums)} -> {target} has no solution.")
        return f"{equation}={target}", equation
    win_steps, equation, _ = rng.choice(wins)
    fails = [p for p in paths if p[2] != target and max(s[3] for s in p[0]) <= max_value]
    if not fails:
        fails = [p for p in paths if p[2] != target]
    n_failed = min(rng.randint(0, max_failed), len(fails))
    lines = [format_steps(p[0]) for p in rng.sample(fails, n_failed)]
    lines.append(format_steps(win_steps))
    return "\n".join(lines), equation


def completion_text(thinking: str, equation: str) -> str:
    """The text a model learns after the prompt's ``<think>``."""
    return f"{thinking}</think>\n<answer>{equation}</answer>"


# ------------------------------------------------------------------------------------ generator
def problem_key(nums: Sequence[int], target: int) -> str:
    """Canonical identity of a problem: the numbers as a multiset, and the target."""
    return ",".join(str(n) for n in sorted(int(n) for n in nums)) + f"->{int(target)}"


def problem_split(nums: Sequence[int], target: int, test_fraction: float = TEST_FRACTION) -> str:
    """``"test"`` or ``"train"``, decided by a hash of the problem (stable across runs and seeds)."""
    digest = hashlib.sha256(problem_key(nums, target).encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") / 2**64 < test_fraction else "train"


def generate_problems(
    n: int,
    seed: int,
    min_numbers: int = 3,
    max_numbers: int = 4,
    max_number: int = 100,
    max_target: int = 1000,
    min_number: int = 1,
    split: str | None = None,
    test_fraction: float = TEST_FRACTION,
    max_attempts: int | None = None,
) -> list[dict]:
    """Generate ``n`` distinct solvable Countdown problems, deterministically from ``seed``.

    Numbers are uniform in ``[min_number, max_number]``; the target is uniform among the distinct
    values in ``[1, max_target]`` that the numbers reach with positive integer intermediate values.
    Every problem is verified by :func:`solve`.

    Args:
        n (`int`): how many problems.
        seed (`int`): the random seed; the same arguments give the same list.
        min_numbers, max_numbers (`int`, defaults to 3 and 4): the count of numbers per problem.
        max_number (`int`, defaults to 100): the largest number drawn.
        max_target (`int`, defaults to 1000): the largest target.
        min_number (`int`, defaults to 1): the smallest number drawn.
        split (`str`, optional): ``"train"`` or ``"test"`` keeps only problems of that hash partition.
        test_fraction (`float`, defaults to 0.1): the share of all problems in the test partition.
        max_attempts (`int`, optional): give up after this many draws (default ``50 * n + 1000``).

    Returns:
        A list of ``{"nums": [int, ...], "target": int}``.
    """
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}.")
    if not 2 <= min_numbers <= max_numbers <= MAX_SOLVER_NUMBERS - 1:
        raise ValueError(
            f"need 2 <= min_numbers <= max_numbers <= {MAX_SOLVER_NUMBERS - 1}, got {min_numbers} and {max_numbers}."
        )
    if not 1 <= min_number <= max_number:
        raise ValueError(f"need 1 <= min_number <= max_number, got {min_number} and {max_number}.")
    if max_target < 1:
        raise ValueError(f"max_target must be at least 1, got {max_target}.")
    rng = random.Random(seed)
    attempts = max_attempts if max_attempts is not None else 50 * n + 1000
    seen: set[str] = set()
    problems: list[dict] = []
    for _ in range(attempts):
        if len(problems) >= n:
            break
        count = rng.randint(min_numbers, max_numbers)
        nums = [rng.randint(min_number, max_number) for _ in range(count)]
        reachable = sorted({v for _, _, v in integer_paths(nums) if 1 <= v <= max_target})
        if not reachable:
            continue
        target = rng.choice(reachable)
        key = problem_key(nums, target)
        if key in seen:
            continue
        if split is not None and problem_split(nums, target, test_fraction) != split:
            continue
        if solve(nums, target) is None:  # pragma: no cover - integer paths are solutions
            raise AssertionError(f"generator produced an unsolvable problem {nums} -> {target}")
        seen.add(key)
        problems.append({"nums": nums, "target": target})
    if len(problems) < n:
        raise ValueError(
            f"could only generate {len(problems)} of {n} distinct problems with these settings; "
            "widen the number range or ask for fewer problems."
        )
    return problems


def train_test_split(problems: Sequence[dict], test_size: int | float, seed: int) -> tuple[list[dict], list[dict]]:
    """Split problems into disjoint train and test lists (duplicates never straddle the split).

    Args:
        problems (`Sequence[dict]`): ``{"nums", "target"}`` records.
        test_size (`int` or `float`): a count, or a fraction in (0, 1), of distinct problems.
        seed (`int`): shuffles which problems go to test.
    """
    groups: dict[str, list[dict]] = {}
    for p in problems:
        groups.setdefault(problem_key(p["nums"], p["target"]), []).append(p)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    if isinstance(test_size, float) and not 0.0 < test_size < 1.0:
        raise ValueError(f"a fractional test_size must be in (0, 1), got {test_size}.")
    n_test = round(test_size * len(keys)) if isinstance(test_size, float) else int(test_size)
    if not 0 <= n_test <= len(keys):
        raise ValueError(f"test_size {test_size} does not fit {len(keys)} distinct problems.")
    test_keys = set(keys[:n_test])
    train = [p for p in problems if problem_key(p["nums"], p["target"]) not in test_keys]
    test = [p for p in problems if problem_key(p["nums"], p["target"]) in test_keys]
    return train, test

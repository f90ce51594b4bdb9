"""Countdown rewards: format and equation, in TRL's reward-function signature.

A completion is text the policy wrote after the prompt's ``<think>``; it is untrusted input. The
equation is evaluated by :func:`safe_eval`, a bounded recursive-descent evaluator of
``+ - * /``, parentheses and decimal literals: it never calls ``eval``, never raises and returns
``None`` for anything it will not evaluate, so a hostile completion costs a reward of 0, not a hang.

Usage:
    >>> format_reward([" 3+5=8 </think>\\n<answer>3 + 5</answer>"])
    [1.0]
    >>> equation_reward(["...</think>\\n<answer>(3 + 5) * 7</answer>"], nums=[[3, 5, 7]], target=[56])
    [1.0]
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

# Bounds of safe_eval. A Countdown equation over 3-6 numbers below 1000 is a few dozen characters,
# nests a handful of levels and never leaves +-1e12; these leave ample room and no room for abuse.
MAX_EXPR_LENGTH = 1024
MAX_DEPTH = 64
MAX_MAGNITUDE = 1e15
# note: the value must hit the target to within this, as in PeRL / mini-R1.
TARGET_TOLERANCE = 1e-5

# PeRL / mini-R1's format regex. The think block may contain '<' but not another <think> or
# </think>; the answer is anything. Matched with fullmatch: nothing may follow </answer>, not even
# the trailing newline that `$` would let through.
FORMAT_PATTERN = re.compile(r"<think>([^<]*(?:<(?!/?think>)[^<]*)*)</think>\n<answer>([\s\S]*?)</answer>")
# ASCII only: a unicode digit such as '３' is not one of the given numbers.
EQUATION_CHARS = re.compile(r"[0-9+\-*/().\s]+", re.ASCII)
# A literal as safe_eval reads it; only pure digit strings can be one of the given integers.
NUMBER_LITERAL = re.compile(r"[0-9]*\.?[0-9]+\.?", re.ASCII)
THINK_PREFIX = "<think>"


class _Reject(Exception):
    """Internal: the expression is outside the accepted language or bounds."""


class _Parser:
    """Recursive descent over ``expr := term (('+'|'-') term)*``,
    ``term := unary (('*'|'/') unary)*``, ``unary := ('+'|'-') unary | atom``,
    ``atom := number | '(' expr ')'``. Every value is checked against MAX_MAGNITUDE."""

    def __init__(self, text: str):
        self.s = text
        self.i = 0
        self.depth = 0

    def _skip(self) -> None:
        s, i = self.s, self.i
        while i < len(s) and s[i] in " \t\n\r\f\v":
            i += 1
        self.i = i

    def _peek(self) -> str:
        self._skip()
        return self.s[self.i] if self.i < len(self.s) else ""

    def _check(self, value: float) -> float:
        if not math.isfinite(value) or abs(value) > MAX_MAGNITUDE:
            raise _Reject
        return value

    def _enter(self) -> None:
        # note: unary signs and parentheses both recurse, so both count toward the depth bound;
        # this is what keeps "((((...))))" and "-------1" from reaching Python's recursion limit.
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _Reject

    def parse(self) -> float:
        value = self.expr()
        if self._peek() != "":
            raise _Reject
        return value

    def expr(self) -> float:
        value = self.term()
        while (op := self._peek()) in ("+", "-"):
            self.i += 1
            rhs = self.term()
            value = self._check(value + rhs if op == "+" else value - rhs)
        return value

    def term(self) -> float:
        value = self.unary()
        while (op := self._peek()) in ("*", "/"):
            self.i += 1
            rhs = self.unary()  # '**' and '//' fail here: a second operator is not a unary
            if op == "*":
                value = self._check(value * rhs)
            else:
                if rhs == 0:
                    raise _Reject
                value = self._check(value / rhs)
        return value

    def unary(self) -> float:
        op = self._peek()
        if op in ("+", "-"):
            self.i += 1
            self._enter()
            value = self.unary()
            self.depth -= 1
            return -value if op == "-" else value
        return self.atom()

    def atom(self) -> float:
        c = self._peek()
        if c == "(":
            self.i += 1
            self._enter()
            value = self.expr()
            if self._peek() != ")":
                raise _Reject
            self.i += 1
            self.depth -= 1
            return value
        match = NUMBER_LITERAL.match(self.s, self.i)
        if match is None or match.group().count(".") > 1:
            raise _Reject
        self.i = match.end()
        return self._check(float(match.group()))


def safe_eval(expr: str) -> float | None:
    """Evaluate an arithmetic expression of ``+ - * /``, parentheses and decimal literals.

    Returns the value as a float (Python's float arithmetic, so it agrees with ``eval`` on the
    same text), or ``None`` when the text is not such an expression or breaks a bound: longer than
    ``MAX_EXPR_LENGTH`` characters, nested deeper than ``MAX_DEPTH``, an intermediate value beyond
    ``MAX_MAGNITUDE``, a division by zero, ``**``/``//``, names, calls or any other character.
    Never raises, never calls ``eval``, runs in time linear in the (bounded) length.

    Usage:
        >>> safe_eval("(3 + 5) * 7 / 2")
        28.0
        >>> safe_eval("9**9**9") is None
        True

    Args:
        expr (`str`): the expression text; anything that is not a `str` gives ``None``.
    """
    if not isinstance(expr, str) or len(expr) > MAX_EXPR_LENGTH:
        return None
    try:
        return _Parser(expr).parse()
    except (_Reject, ValueError, OverflowError, ZeroDivisionError, RecursionError):
        return None


def completion_content(completion: Any) -> str:
    """The text of one completion: a string as is; for conversational data (a list of
    ``{"role", "content"}`` messages, as TRL passes them) the concatenated message contents."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    if isinstance(completion, (list, tuple)):
        parts = []
        for message in completion:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, str):
                parts.append(content)
            elif isinstance(content, list):  # multimodal style: [{"type": "text", "text": ...}]
                parts.extend(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
        return "".join(parts)
    return ""


def extract_answer(text: str) -> str | None:
    """The content of the last ``<answer>...</answer>`` in ``text``, or ``None`` if there is none."""
    end = text.rfind("</answer>")
    if end < 0:
        return None
    start = text.rfind("<answer>", 0, end)
    if start < 0:
        return None
    return text[start + len("<answer>") : end]


def _as_int_list(nums: Any) -> list[int] | None:
    try:
        values = [int(n) for n in nums]
        if any(float(v) != float(n) for v, n in zip(values, nums)):
            return None  # a non-integral "number" can never be matched by digits
        return values
    except (TypeError, ValueError, OverflowError):
        return None


def score_equation(text: str, nums: Sequence[int], target: float) -> float:
    """1.0 when the last answer in ``text`` is an equation that uses every number of ``nums``
    exactly once, contains only digits, ``+ - * / ( ) .`` and whitespace, and evaluates to
    within ``TARGET_TOLERANCE`` of ``target``; 0.0 otherwise."""
    equation = extract_answer(text)
    if equation is None or len(equation) > MAX_EXPR_LENGTH:
        return 0.0
    if EQUATION_CHARS.fullmatch(equation) is None:
        return 0.0
    given = _as_int_list(nums)
    if given is None:
        return 0.0
    # note: a literal with a decimal point (e.g. "2.5" built from 2 and 5) is never one of the
    # given integers, so it fails here; PeRL's `\d+` would have counted it as 2 and 5.
    literals = NUMBER_LITERAL.findall(equation)
    if any(not lit.isdigit() for lit in literals):
        return 0.0
    if Counter(int(lit) for lit in literals) != Counter(given):
        return 0.0
    value = safe_eval(equation)
    try:
        target = float(target)
    except (TypeError, ValueError, OverflowError):
        return 0.0
    if value is None or not math.isfinite(target):
        return 0.0
    return 1.0 if abs(value - target) <= TARGET_TOLERANCE else 0.0


def format_reward(completions: Sequence[Any], **kwargs) -> list[float]:
    """TRL reward function: 1.0 when ``"<think>" + completion`` is exactly
    ``<think>...</think>\\n<answer>...</answer>``, else 0.0.

    Usage:
        >>> format_reward([" 3+5=8 </think>\\n<answer>3 + 5</answer>", " no tags"])
        [1.0, 0.0]
        >>> # GRPOTrainer(..., reward_funcs=[format_reward, equation_reward]) logs rewards/format_reward/mean

    Args:
        completions (`list[str]` or `list[list[dict]]`): one completion per sample, continuing after
            the prompt's ``<think>``; conversational completions are lists of messages.
        **kwargs: the other columns and TRL's extras (prompts, completion_ids, trainer_state, ...);
            unused.
    """
    return [
        1.0 if FORMAT_PATTERN.fullmatch(THINK_PREFIX + completion_content(c)) is not None else 0.0 for c in completions
    ]


def equation_reward(
    completions: Sequence[Any], nums: Sequence[Sequence[int]], target: Sequence[float], **kwargs
) -> list[float]:
    """TRL reward function: 1.0 when the last ``<answer>`` holds a correct Countdown equation
    (see :func:`score_equation`), else 0.0.

    Usage:
        >>> equation_reward(["</think>\\n<answer>7 * (5 + 3)</answer>"], nums=[[3, 5, 7]], target=[56])
        [1.0]

    Args:
        completions (`list[str]` or `list[list[dict]]`): one completion per sample.
        nums (`list[list[int]]`): the dataset column, aligned with ``completions``.
        target (`list[int]`): the dataset column, aligned with ``completions``.
        **kwargs: TRL's other columns and extras; unused.
    """
    return [
        score_equation(THINK_PREFIX + completion_content(c), n, t)
        for c, n, t in zip(completions, nums, target, strict=True)
    ]

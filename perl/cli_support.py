"""What every ``perlwb`` command shares: a parser whose mistakes are one line, and the error printer.

Usage:
    >>> from perl.cli_support import OneLineParser, parse_or_fail
    >>> parser = OneLineParser(prog="perlwb report")
    >>> args = parse_or_fail(parser, argv)     # "perlwb report: error: ..." on stderr, then 2
    >>> if isinstance(args, int):
    ...     return args

A user's mistake on any command is one stderr line, ``<prog>: error: <one sentence>``, and exit code 2.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence

__all__ = ["PROG", "EXIT_USAGE", "UsageError", "OneLineParser", "one_line", "fail", "parse_or_fail", "positive_int"]

PROG = "perlwb"
EXIT_USAGE = 2


class UsageError(Exception):
    """A mistake on the command line; its message becomes the one stderr line."""


class OneLineParser(argparse.ArgumentParser):
    """An `argparse.ArgumentParser` that raises `UsageError` instead of printing usage and exiting."""

    # note: argparse prints usage plus a message over several lines and exits; we want one line.
    def error(self, message: str) -> None:  # type: ignore[override]
        missing = re.match(r"argument (\S+): expected one argument", message)
        if missing:
            message = f"{missing.group(1)} expects a value (see --help)."
        raise UsageError(message)


def positive_int(text: str) -> int:
    """An argparse ``type``: an integer of at least 1 (else the flag's one-line error)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def one_line(message: str) -> str:
    """``message`` on one line (whitespace runs joined), ending in a full stop."""
    text = " ".join(str(message).split())
    return text if text.endswith((".", "?", "!")) else text + "."


def fail(message: str, prog: str = PROG) -> int:
    """Print ``<prog>: error: <message>`` as one stderr line; return the usage exit code (2)."""
    print(f"{prog}: error: {one_line(message)}", file=sys.stderr)
    return EXIT_USAGE


def parse_or_fail(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None, check: Callable | None = None
) -> argparse.Namespace | int:
    """``parser.parse_args(argv)``, then ``check(args)`` if given; a mistake in either (`UsageError`,
    or `ValueError` from ``check``) is printed as the one stderr line and the usage exit code is
    returned instead of the arguments."""
    try:
        args = parser.parse_args(argv)
        if check is not None:
            check(args)
    except (UsageError, ValueError) as exc:
        return fail(str(exc), prog=parser.prog)
    return args

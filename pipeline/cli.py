"""Command-line entry points: bad input is one sentence on stderr and exit status 2."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable, NoReturn


class UsageError(SystemExit):
    """Bad input, found before any work."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = f"error: {message}"

    def __str__(self) -> str:
        return self.message


def run(main: Callable[[], int]) -> NoReturn:
    """Run ``main``; a UsageError becomes its sentence on stderr and exit status 2 (a bare
    SystemExit(2) would exit silently); a closed pipe on stdout ends the command quietly."""
    try:
        code = main()
        sys.stdout.flush()
    except UsageError as e:
        print(e.message, file=sys.stderr, flush=True)
        code = e.code
    except BrokenPipeError:  # the reader went away (``make status | head``): what it wanted was printed
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that exiting flushes nowhere
        code = 0
    sys.exit(code)


def _number(kind, test, wanted: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {wanted}") from None
        if not test(value):
            raise argparse.ArgumentTypeError(f"{text} is not {wanted}")
        return value
    parse.__name__ = wanted  # what argparse names in its own messages
    return parse


# argparse types: a bad value gets argparse's one-line error (and exit status 2) before any work
positive_int = _number(int, lambda v: v >= 1, "a positive integer")
non_negative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
non_negative_float = _number(float, lambda v: v >= 0, "a number >= 0")
positive_float = _number(float, lambda v: v > 0, "a number > 0")


def existing_dir(text: str) -> Path:
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is not a directory" if path.exists() else f"{text} does not exist")
    return path

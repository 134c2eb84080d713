"""Command-line entry points: bad input is one sentence on stderr and exit status 2."""
from __future__ import annotations

import sys
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
    SystemExit(2) would exit silently)."""
    try:
        code = main()
    except UsageError as e:
        print(e.message, file=sys.stderr, flush=True)
        code = 2
    sys.exit(code)

"""What a stage says on the console while it works, without a CLI library.

Stages are libraries (Ray actors and notebooks import them), so they print
through these two functions rather than through a CLI library: progress goes to
stdout or stderr as asked, warnings to stderr, in yellow on a terminal.
"""

from __future__ import annotations

import sys

_YELLOW, _RESET = "\x1b[33m", "\x1b[0m"


def echo(message: str = "", *, err: bool = False) -> None:
    stream = sys.stderr if err else sys.stdout
    print(message, file=stream, flush=True)


def warn(message: str) -> None:
    """A warning on stderr (yellow when stderr is a terminal)."""
    text = f"{_YELLOW}{message}{_RESET}" if sys.stderr.isatty() else message
    print(text, file=sys.stderr, flush=True)

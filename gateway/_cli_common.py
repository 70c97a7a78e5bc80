"""What the command line's modules share: a user's mistake and its exit code, and checking files."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

EXIT_USAGE = 2


class UserError(Exception):
    """A mistake in how a command was called; printed as one line, never a traceback."""


def check_files(files: Sequence[Path], load: Callable[[Path], Any], error: type[Exception],
                described: Callable[[Any], str]) -> int:
    """Load each file; print its problems (``error.problems``) or ``path: ok (described)``; 1 if any failed."""
    failed = False
    for path in files:
        try:
            loaded = load(path)
        except error as err:
            print("\n".join(err.problems), file=sys.stderr)  # type: ignore[attr-defined]
            failed = True
        else:
            print(f"{path}: ok ({described(loaded)})")
    return 1 if failed else 0

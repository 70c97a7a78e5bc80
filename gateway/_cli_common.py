"""What the command line's modules share: a user's mistake and its exit code."""

from __future__ import annotations

EXIT_USAGE = 2


class UserError(Exception):
    """A mistake in how a command was called; printed as one line, never a traceback."""

"""Errors a user acts on: each is printed as one line naming the fix, exit code 2.

Engines raise them; the command line (`freshet.cli`) prints them.
"""

from __future__ import annotations


class CliError(RuntimeError):
    """A user-facing failure: printed as one line, exit code 2."""

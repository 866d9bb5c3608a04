"""Errors that mean "the request cannot be served": the CLI turns them into exit status 2.

Import-light (no torch): the CLI and the registry use them before anything heavy loads.
"""

from __future__ import annotations


class UsageError(ValueError):
    """A bad option, setting or name, found before any study is touched; says what to do."""

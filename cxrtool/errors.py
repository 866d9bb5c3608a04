"""Errors that mean "the request cannot be served": the CLI turns a UsageError into exit
status 2 and an OutputError (nowhere to write the results) into 3.

Import-light (no torch): the CLI and the registry use them before anything heavy loads.
"""

from __future__ import annotations


class UsageError(ValueError):
    """A bad option, setting or name, found before any study is touched; says what to do."""


class OutputError(OSError):
    """An output that cannot be written (a read-only or full disk, a path that is a link,
    no permission): one line naming the path and the reason. The run stops at once, what
    it wrote before stays whole, and the CLI exits with :data:`EXIT_OUTPUT`."""


EXIT_OUTPUT = 3  # the CLI's exit status for an OutputError


class EngineError(RuntimeError):
    """The engine a run was given stopped under it (a Ray cluster lost, a node that cannot
    see the run's folder): one line saying why. What the run wrote before stays whole, and
    running it again does the rest; the CLI exits with :data:`EXIT_ENGINE`."""


EXIT_ENGINE = 1  # as for a run some of whose studies were not done: running it again does the rest


def env_seconds(name: str, default: float) -> float:
    """A number of seconds from the environment variable ``name``: ``default`` where it is
    unset, empty or not above zero.

    Raises:
        UsageError: it is set to something that is not a number (said with its name).
    """
    import os

    raw = os.environ.get(name, "")
    try:
        value = float(raw or default)
    except ValueError:
        raise UsageError(f"{name}: a number of seconds, not {brief(raw)}") from None
    return value if value > 0 else float(default)


def brief(value: object, limit: int = 80, *, quote: bool = True) -> str:
    """A value as an error message may show it: its repr (``quote``) or its text, on one
    line, cut to ``limit`` characters: a message never carries a value whole (a file's
    field may hold anything)."""
    import reprlib

    if isinstance(value, str):
        text = repr(value[: limit + 1]) if quote else value[: 4 * limit]
    else:
        shortened = reprlib.Repr()
        shortened.maxlevel, shortened.maxstring, shortened.maxother = 3, limit, limit
        shortened.maxlist = shortened.maxtuple = shortened.maxdict = shortened.maxset = 8
        text = shortened.repr(value) if quote else str(value)[: 4 * limit]
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."

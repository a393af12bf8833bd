"""Errors every probattn verb turns into one line and an exit code (no traceback).

They live here, in the base package, so that ``probattn.models`` (training, text) and
``probattn.export`` (export, verify, predict) raise the same classes.
"""


class ProbattnError(Exception):
    """Base class. ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class UsageError(ProbattnError):
    """Bad input or options: says what was received and what is allowed. Exit 2."""

    exit_code = 2


def one_line(text: str, limit: int = 400) -> str:
    """Collapse a (possibly multi-line) message from a library into one short line."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."

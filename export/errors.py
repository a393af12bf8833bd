"""Errors the command line turns into one line and an exit code (no traceback)."""


class ProbattnError(Exception):
    """Base class. ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class UsageError(ProbattnError):
    """Bad input or options: says what was received and what is allowed. Exit 2."""

    exit_code = 2


class ParityFailure(ProbattnError):
    """An artifact does not match the reference within tolerance. Exit 1."""

    exit_code = 1


def one_line(text: str, limit: int = 400) -> str:
    """Collapse a (possibly multi-line) message from a library into one short line."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."

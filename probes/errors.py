"""The one error type kvlens raises for bad input: its message is a single line for the user."""

from __future__ import annotations


class KvlensError(Exception):
    """A user-facing failure: wrong path, bad parameter, damaged dump, too long a prompt.

    The CLI prints ``kvlens: error: <message>`` and exits non-zero; the app shows the
    message in the page. The message must be one line and say what to do where it can.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class DumpError(KvlensError):
    """A dump folder that is missing, damaged, foreign or from an unknown schema."""


def one_line(exc: BaseException) -> str:
    """Any exception as the one line a user is shown: a KvlensError's own message, anything
    else its type and the first 300 characters of its message on one line."""
    if isinstance(exc, KvlensError):
        return str(exc)
    return f"{exc.__class__.__name__}: {' '.join(str(exc).split())[:300]}"

"""The exception a user can cause (printed by the CLI as one line), and the one a signal causes."""

import difflib
import signal
from typing import Any, Iterable


class MergeError(Exception):
    """A problem with the user's input (recipe, checkpoint, output path).

    The message names the file, key or tensor at fault and is printed as one line.
    """


class Interrupted(Exception):
    """SIGINT, SIGTERM or SIGHUP arrived during a merge; cleanup has run when the CLI sees it."""

    def __init__(self, signum: int, published: bool = False) -> None:
        self.signum = signum
        self.published = published  # the signal came while the finished output was being published
        super().__init__(signal.Signals(signum).name)


def key_text(key: Any) -> str:
    """A recipe key or name as it goes into a one-line message: plain if printable, else its repr."""
    return key if isinstance(key, str) and key and key.isprintable() and key.strip() == key else repr(key)


def did_you_mean(key: Any, allowed: Iterable[str]) -> str:
    """'did you mean 'x'? ' when ``key`` is a near-miss of an allowed name, else ''."""
    close = difflib.get_close_matches(key, list(allowed), n=1) if isinstance(key, str) else []
    return f"did you mean '{close[0]}'? " if close else ""

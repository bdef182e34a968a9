"""The one exception type a user can cause.

Every problem that comes from the user's input (a bad path, a bad value, a model that
cannot be loaded) is raised as :class:`TokenFlowError` with a one-line message that names
the bad value and what is allowed. The command prints that line and exits with status 2.
"""

from __future__ import annotations

from typing import Any

MAX_MESSAGE = 400  # characters: a message is one line a person reads, whatever the input was
MAX_VALUE = 80


def shown(value: Any) -> str:
    """``repr`` of a user's value for a message, cut to a bounded length."""
    text = repr(value)
    return text if len(text) <= MAX_VALUE else text[:MAX_VALUE - 12] + "..." + text[-9:]


def install_hint(extra: str) -> str:
    """The command that installs an optional extra into the Python running us (its own pip: the right
    environment, whether or not it is activated)."""
    import sys

    from . import DISTRIBUTION

    return f"{sys.executable} -m pip install '{DISTRIBUTION}[{extra}]'"


def human_bytes(n: float) -> str:
    """A size for a message: ``512 B``, ``3.4 MB``."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


class TokenFlowError(ValueError):
    """A problem with the user's input; its message is one line, meant to be shown as is."""

    def __init__(self, message: str):
        text = " ".join(str(message).split())
        if len(text) > MAX_MESSAGE:
            text = text[:MAX_MESSAGE - 3] + "..."
        super().__init__(text)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM: stop now; the command says how to resume."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class RunFailed(TokenFlowError):
    """The run could not go on for a reason that is not the user's input (out of memory, a peer
    rank that stopped): one line, and the command exits 1 rather than 2."""


class RankStopped(RunFailed):
    """One edit across ranks: a collective failed on this rank (usually another rank stopped first)."""


class OutOfMemory(RunFailed):
    """The device ran out of memory even with the smallest batches: the message names the
    setting to lower. Not the user's typo, so the command exits 1 rather than 2."""

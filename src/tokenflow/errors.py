"""The one exception type a user can cause.

Every problem that comes from the user's input (a bad path, a bad value, a model that
cannot be loaded) is raised as :class:`TokenFlowError` with a one-line message that names
the bad value and what is allowed. The command prints that line and exits with status 2.
"""

from __future__ import annotations


class TokenFlowError(ValueError):
    """A problem with the user's input; its message is one line, meant to be shown as is."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))

"""The one exception type a user can cause.

Every error that a user's input can provoke (a bad path, a bad config, a corrupt checkpoint, text that
is too short) is an :class:`RVQError` whose message is one line naming the problem and the fix. The CLI
prints that line and exits non-zero; anything else is a bug and keeps its traceback.
"""


class RVQError(Exception):
    """A user-facing error: ``str(err)`` is a single line that names the problem and the fix."""


class ResumableError(RVQError):
    """An :class:`RVQError` after which the run can go on (e.g. out of device memory): the finished blocks
    are kept for ``--resume``."""

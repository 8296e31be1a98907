"""One exception type for every mistake a user can fix.

The CLI prints its message as one line and exits 2; the message names the
file, line or document involved and says what to do.
"""


class ClovaError(Exception):
    """A user-facing error: one line, says what went wrong and what to do."""

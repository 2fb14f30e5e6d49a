"""One exception type for every user-facing error: the message names the problem and the fix."""


class DoriError(Exception):
    """Raised for bad input (missing files, malformed prompt sets, unknown names, ...)."""

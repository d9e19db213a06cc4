"""Exceptions for problems a user can fix; the scripts print their message as one line."""


class UsageError(Exception):
    """A flag value, file or environment that cannot work; the message names it and the fix."""


class CheckpointError(UsageError):
    """A checkpoint that cannot be read, or was not written by these scripts."""


EXIT_OK, EXIT_DIVERGED, EXIT_INTERRUPTED = 0, 1, 130  # process exit codes of a run

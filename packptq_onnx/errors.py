"""Errors the CLI turns into one-line messages: UsageError exits 2, anything else exits 1."""


class UsageError(Exception):
    """Bad input from the user (file, data, option): exit code 2, message says what to do."""

    exit_code = 2

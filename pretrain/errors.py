"""Errors a user can fix: the CLI prints their message alone (no traceback unless --debug) and exits non-zero."""


class UserError(Exception):
    """Bad input: the message names the problem and the fix."""

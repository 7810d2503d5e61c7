"""Errors a user can fix: the CLI prints their message alone (no traceback unless --debug) and exits non-zero."""


class UserError(ValueError):
    """Bad input: the message names the problem and the fix. (A ValueError, so that Python callers of the library
    catch it where they catch bad arguments.)"""

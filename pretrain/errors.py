"""Errors a user can fix: the CLI prints their message alone (no traceback unless --debug) and exits non-zero."""


class UserError(ValueError):
    """Bad input: the message names the problem and the fix. (A ValueError, so that Python callers of the library
    catch it where they catch bad arguments.)"""


def unknown_options(message: str, known: list[str], command: str) -> str:
    """argparse's "unrecognized arguments: ..." (or another parse error) as one line, with the nearest known option
    for each unknown one and where the options are listed."""
    import difflib
    import re

    hints = []
    if "unrecognized arguments" in message:
        for option in re.findall(r"(--[\w.\-]+)", message.partition("unrecognized arguments")[2]):
            name = option.split("=")[0]
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
            if close:
                hints.append(f"did you mean {close[0]}?")
    return f"{message.rstrip('.')}{'; ' + ' '.join(hints) if hints else ''} ({command} --help lists the options)"

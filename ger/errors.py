"""Errors that mean "the input is wrong", not "ger is broken": the CLI prints them as one line.

`ger` raises ValueError (or a subclass: MediaError, UserError) for bad input throughout, with
a message that names the file or option and the fix; FileNotFoundError for a missing path.
The CLI shows those without a traceback; HYDRA_FULL_ERROR=1 or --debug keeps the traceback.
"""

from __future__ import annotations

import os


class UserError(ValueError):
    """Bad input the user can fix: a broken label list, an invalid option, an unusable cache file."""


USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, NotADirectoryError)
DEBUG_HINT = "(run with --debug or HYDRA_FULL_ERROR=1 for the traceback)"


def want_traceback(argv: list[str]) -> bool:
    """--debug on the command line, or Hydra's own switch for full tracebacks."""
    return "--debug" in argv or os.environ.get("HYDRA_FULL_ERROR") == "1"


def one_line(command: str, err: BaseException) -> str:
    """`ger run: error: <message>` plus where to get the traceback; the message keeps its own lines
    (a label list's problems are listed one per line), nothing else is added."""
    return f"ger {command}: error: {err}\n{DEBUG_HINT}"

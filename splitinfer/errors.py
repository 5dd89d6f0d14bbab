"""The one exception type that means "the user gave bad input": reported as one line, exit status 2."""
from __future__ import annotations

import functools
import sys
from typing import Callable


class UserError(Exception):
    """Bad input from the command line or configuration; the message is shown as is."""


def one_line_errors(main: Callable[..., int]) -> Callable[..., int]:
    """Wrap a command's main so that a UserError is one line on stderr and exit status 2."""
    @functools.wraps(main)
    def wrapped(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    return wrapped

"""Bad input, reported as one line on stderr and exit status 2: the exception type that means it, and the
command-line parser that does the same for bad flags."""
from __future__ import annotations

import argparse
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


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr and exit status 2."""

    def error(self, message: str) -> None:
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)

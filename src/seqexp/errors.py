"""Errors the user can fix. Entry points print them as one short line, without a traceback."""

import os
import sys
from contextlib import contextmanager


class UserError(Exception):
    """Bad input: a config value, a missing file, a corrupt archive. The message names the fix."""

    exit_code = 2
    label = "error"  # the word before the message on stderr


def require(ok: bool, message: str) -> None:
    """A config check: `message` (naming the key and what is allowed) when `ok` is false."""
    if not ok:
        raise UserError(message)


@contextmanager
def user_errors():
    """A user error is one line on stderr and exit code 2 (3 for non-finite values, 75 for a run
    stopped by SIGTERM/SIGINT after saving the last checkpoint).

    SEQEXP_DEBUG=1 shows the full traceback instead.
    """
    try:
        yield
    except UserError as e:
        if os.environ.get("SEQEXP_DEBUG"):
            raise
        print(f"{e.label}: {e}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)

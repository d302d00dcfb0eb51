"""Errors the user can fix. Entry points print them as one short line, without a traceback."""


class UserError(Exception):
    """Bad input: a config value, a missing file, a corrupt archive. The message names the fix."""

    exit_code = 2
    label = "error"  # the word before the message on stderr

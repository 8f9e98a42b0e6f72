"""The errors train.py reports to the user, shared by the option builder, the run directory and the launcher.

Both are click exceptions: click prints 'Error: <message>' (exit status 1) without a traceback, which is what
a wrong flag or a failed run deserves. They live here, not in train.py, because `training` may not import the
script that composes it.
"""

import click


class UserError(click.ClickException):
    """A problem with the command line or the data; click prints 'Error: <message>' without a traceback."""


class RunFailed(UserError):
    """The training processes stopped with an error; the message is the one line the user sees. `traceback`
    says whether log.txt holds the traceback of the error (a killed process leaves none)."""

    def __init__(self, message: str, traceback: bool = True):
        super().__init__(message)
        self.traceback = traceback


def warn(message: str) -> None:
    """One 'warn: ...' line on stderr, for an option that is accepted but has no effect."""
    click.echo(f'warn: {message}', err=True)

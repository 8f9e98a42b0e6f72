"""The errors train.py reports to the user, shared by the option builder, the run directory and the launcher.

Both are click exceptions: click prints 'Error: <message>' (exit status 1) without a traceback, which is what
a wrong flag or a failed run deserves. They live here, not in train.py, because `training` may not import the
script that composes it.
"""

import math

import click


class UserError(click.ClickException):
    """A problem with the command line or the data; click prints 'Error: <message>' without a traceback."""


class RunFailed(UserError):
    """The training processes stopped with an error; the message is the one line the user sees. `traceback`
    says whether log.txt holds the traceback of the error (a killed process leaves none)."""

    def __init__(self, message: str, traceback: bool = True):
        super().__init__(message)
        self.traceback = traceback


class FiniteFloatRange(click.FloatRange):
    """click.FloatRange that also refuses nan and inf, for every float option of every script. FloatRange alone
    lets `--gamma=nan` through (every comparison with nan is false): a nan R1 weight silently disables the
    regularization, and `generate.py --trunc=nan` writes black images."""

    def convert(self, value, param, ctx):
        value = super().convert(value, param, ctx)
        if not math.isfinite(value):
            self.fail(f'{value} is not a finite number', param, ctx)
        return value


def sentence(text: str) -> str:
    """`text` ending in exactly one full stop, so that messages built from other messages ('<error>. The log
    is ...') never read '..' whether or not the inner message ended with a period."""
    text = text.rstrip()
    return text if text.endswith(('.', '!', '?')) else text + '.'


def warn(message: str) -> None:
    """One 'warn: ...' line on stderr, for an option that is accepted but has no effect."""
    click.echo(f'warn: {message}', err=True)

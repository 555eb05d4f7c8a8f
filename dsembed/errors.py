"""User-facing errors and the command-line wrapper that turns them into one line and exit code 2.

Every mistake a user can make with a recipe, a data file, a checkpoint or a command line raises a
subclass of `UserError` whose message already names the file / key / line and the fix. Entry points
wrap their `main` with `run_cli`, so such errors never show a traceback.
"""
from __future__ import annotations

import sys
from typing import Callable


class UserError(Exception):
    """A problem with the user's input; the message is the whole explanation (one line)."""


class RecipeError(UserError):
    """A recipe that does not parse, does not fit the schema or breaks a cross-section rule."""


class DataError(UserError):
    """A training or evaluation data file that cannot be read; the message names file:line."""


class CheckpointError(UserError):
    """A missing, incomplete or incompatible checkpoint or exported model."""


class TrainingError(Exception):
    """Training itself failed (a non-finite loss or gradient norm): exit code 3, not a user mistake.

    Raised on every rank at the same step (the checks are collective); no checkpoint is written for
    the failed step, so `latest` still names the last good one.
    """


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Run an entry point; a `UserError` becomes `error: <message>` on stderr and exit code 2.

    A `TrainingError` (the run diverged) prints the same way and exits with code 3.

    Args:
        main: the entry point; returns an exit code or None (meaning 0).
        argv: arguments without the program name; None reads sys.argv.

    Returns:
        The process exit code.
    """
    try:
        code = main(argv)
    except UserError as err:
        _say_line("error: " + " ".join(str(err).split("\n")))
        return 2
    except TrainingError as err:
        _say_line("error: " + " ".join(str(err).split("\n")))
        return 3
    except KeyboardInterrupt:
        _say_line("interrupted")
        return 130
    return 0 if code is None else int(code)


def _say_line(line: str) -> None:
    """One line to stderr in one write: ranks that fail together share a pipe, and print's two writes
    (text, then newline; stderr writes through) let another rank's line land between them."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()

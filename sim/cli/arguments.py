"""What every command line of this package shares: a parser whose errors are one line, value types whose
messages speak command-line words, and the interrupt/error handling around a command.

A bad value prints ``python -m sim run: error: ...`` and exits with status 2 (no usage block, no traceback);
Ctrl-C prints one line and exits with 130. Results already written stay (each run is stored when it finishes),
so running the same command again resumes.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from ..simulation import NonFiniteGradientError

INTERRUPTED = "interrupted; run the same command again to resume"


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error: what is wrong, and where the help is."""

    def error(self, message: str):  # argparse's contract: print and exit, never return
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _whole(text: str, minimum: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
    return value


def positive_int(text: str) -> int:
    """A whole number >= 1 (workers, processes, steps)."""
    return _whole(text, 1, "a whole number >= 1, e.g. 4")


def count(text: str) -> int:
    """A whole number >= 0."""
    return _whole(text, 0, "a whole number >= 0, e.g. 0 or 100")


def positive_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number > 0, e.g. 60 or 2.5") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number > 0, e.g. 60 or 2.5")
    return value


def add_import_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                        help="import a module first, so the tasks and compressors it registers can be named, e.g. "
                             "--import examples.own_model (repeatable; run from the folder that holds it)")


def run_command(command: Callable[[], int], prog: str) -> int:
    """Run a command: a ValueError (bad input) is one line and status 2; Ctrl-C one line and status 130; an
    OSError (a file that cannot be read or written) or a diverged run (a NaN/Inf gradient under
    ``nonfinite="raise"``) one line and status 1."""
    try:
        return command()
    except KeyboardInterrupt:
        print(f"\n{prog}: {INTERRUPTED}", file=sys.stderr)
        return 130
    except ValueError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (e.g. `| head`): stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 0
    except OSError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 1
    except NonFiniteGradientError as error:
        print(f"{prog}: error: the run diverged: {' '.join(str(error).split())}", file=sys.stderr)
        return 1

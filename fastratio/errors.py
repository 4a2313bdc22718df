"""User-facing errors: the CLI prints their message as one line (no traceback unless --debug)."""

from __future__ import annotations

import argparse
import errno
import sys
from collections.abc import Callable


class UserError(Exception):
    """Bad input from the user (config, file, data, checkpoint); the message names the culprit."""


def os_error(what: str, err: OSError) -> UserError:
    """One line for a failed write (read-only folder, disk full, a file where a folder should be)."""
    return UserError(f"{what}: {err.strerror or type(err).__name__}{' (disk full)' if err.errno == errno.ENOSPC else ''}")


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors (unknown flag, bad choice, missing argument) are one UserError line
    like every other bad input, instead of a usage block on stderr."""

    def error(self, message: str):
        raise UserError(f"{self.prog}: {message} (see --help)")


INTERRUPTED = 130  # the shell's status for a process stopped by SIGINT (128 + 2)


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run ``main``; turn a UserError into 'error: ...' on stderr and exit status 2, and a Ctrl-C that
    interrupts at once (before training's own handler is in place, or the second one: see
    fastratio.guard.StopRequest) into one line and status 130."""
    args = sys.argv[1:] if argv is None else argv
    try:
        return main(args)
    except UserError as err:
        if "--debug" in args:
            raise
        # One line whatever the message holds (library errors quoted inside can span several).
        print("error: " + " ".join(str(err).split()), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if "--debug" in args:
            raise
        print("error: interrupted by Ctrl-C; stopped at once (a file being written was dropped, earlier files are intact)", file=sys.stderr)
        return INTERRUPTED

"""One exception type for bad input: its message is the single line a user sees."""
from __future__ import annotations

import sys
import traceback
from typing import Callable

BAD_INPUT_EXIT = 2
INTERRUPTED_EXIT = 130


class BiometryInputError(Exception):
    """Bad user input (file, row, key). ``str(err)`` is one line naming what is at fault.

    Commands print it alone on stderr and exit non-zero; ``--debug`` adds the traceback.
    """

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def run_cli(command: Callable[[], int | None], *, debug: bool = False,
            also: tuple[type[Exception], ...] = (), interrupted: str | None = None) -> int:
    """Run a command's body and turn bad input into its one line: the exit status.

    Args:
        command: the body, called with no arguments; its return value (None = 0) is the status.
        debug: print the traceback before the line (a command's ``--debug``).
        also: exception types that are bad input too for this command, beside
            :class:`BiometryInputError` and ``OSError`` (a missing, unreadable or full path).
        interrupted: the line printed on Ctrl-C (status 130); None lets the interrupt through.

    Bad input prints ``error: MESSAGE`` on stderr and returns 2::

        def main(argv=None) -> int:
            args = parse_args(argv)
            return run_cli(lambda: run(args), debug=args.debug)
    """
    try:
        return int(command() or 0)
    except (BiometryInputError, OSError, *also) as err:
        if debug:
            traceback.print_exc()
        print(f"error: {err}", file=sys.stderr)
        return BAD_INPUT_EXIT
    except KeyboardInterrupt:
        if interrupted is None:
            raise
        print(interrupted, file=sys.stderr)
        return INTERRUPTED_EXIT

"""What the console scripts share: an error a user can cause ends a command with one ``error: <message>`` line on
stderr and the command's exit status for it, never with a traceback; Ctrl-C with what was kept and status 130."""

from __future__ import annotations

import sys
from typing import Callable, Sequence

ExitCodes = Sequence[tuple["type[BaseException] | tuple[type[BaseException], ...]", int]]


def run_command(command: Callable[[], int], exit_codes: ExitCodes, interrupted: str) -> int:
    """``command()``'s exit status; an exception of a kind in ``exit_codes`` (the first that matches) prints
    ``error: <message>`` and gives its status, Ctrl-C prints ``interrupted`` and gives 130, anything else (a bug)
    propagates."""
    try:
        return command()
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
    except Exception as exc:
        for kinds, code in exit_codes:
            if isinstance(exc, kinds):
                print(f"error: {exc}", file=sys.stderr)
                return code
        raise

"""Errors lsjax raises for bad input: each names the file, tensor or field and what was expected."""

import sys


class LsjaxError(Exception):
    """Base class: bad input a user can fix (never an internal bug)."""


class ConfigError(LsjaxError, ValueError):
    """A config field is missing, unsupported or out of range; `field` names it where one is to blame."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class ConversionError(LsjaxError, ValueError):
    """A checkpoint file cannot be converted: missing/extra tensor, wrong shape or dtype, bad header."""


class CheckpointError(LsjaxError, ValueError):
    """An lsjax checkpoint is missing, incomplete, or would be overwritten."""


def exit_status(command: str, run) -> int:
    """Run a command-line entry point's body: 0 when it returns, 2 with one line on stderr
    (`<command>: error: ...`) when it raises an `LsjaxError`, never a traceback for bad input."""
    try:
        run()
    except LsjaxError as e:
        print(f"{command}: error: {e}", file=sys.stderr)
        return 2
    return 0

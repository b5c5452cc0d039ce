"""Errors lsjax raises for bad input: each names the file, tensor or field and what was expected."""


class LsjaxError(Exception):
    """Base class: bad input a user can fix (never an internal bug)."""


class ConfigError(LsjaxError, ValueError):
    """A config field is missing, unsupported or out of range."""


class ConversionError(LsjaxError, ValueError):
    """A checkpoint file cannot be converted: missing/extra tensor, wrong shape or dtype, bad header."""


class CheckpointError(LsjaxError, ValueError):
    """An lsjax checkpoint is missing, incomplete, or would be overwritten."""

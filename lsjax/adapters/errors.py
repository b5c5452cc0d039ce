"""The adapter package's error: bad adapter files or params, naming the file, key or field."""

from lsjax.errors import LsjaxError


class AdapterError(LsjaxError, ValueError):
    """An adapter (file, params or PEFT folder) does not fit its config, its base model or lsjax."""

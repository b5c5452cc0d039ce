"""Reading the JSON config files lsjax meets (HF configs, adapter configs) with errors that name them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_json_object(path: Path, error: type[Exception], expected: str) -> dict[str, Any]:
    """The JSON object in `path`; otherwise `error` naming the file: missing, invalid or not an object."""
    if not path.is_file():
        raise error(f"{path.parent}: missing {path.name} (expected {expected})")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object")
    return data

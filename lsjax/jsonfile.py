"""JSON files: reading the configs lsjax meets (HF, adapter) with errors that name them; writing results atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_json(path: str | Path, data: Any) -> None:
    """`data` as indented JSON at `path`, atomically (a temporary file renamed into place): a killed
    run never leaves half a result, and processes writing the same file each rename their own."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


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

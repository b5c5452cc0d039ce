"""Read a Hugging Face checkpoint folder lazily with safetensors (no torch).

`config.json` + `model.safetensors`, or a sharded `model.safetensors.index.json`; the tokenizer
files are carried over as they are.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

from lsjax.config import ModelConfig
from lsjax.convert.assemble import LazyTensor
from lsjax.errors import ConversionError
from lsjax.jsonfile import read_json_object

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "chat_template.json", "generation_config.json")
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def read_hf_config(folder: Path) -> tuple[ModelConfig, dict]:
    path = folder / "config.json"
    raw = read_json_object(path, ConversionError, "a Hugging Face model folder")
    return ModelConfig.from_hf(raw, source=str(path)), raw


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files: the shards an index names (all must exist), or the single file."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ConversionError(f"{index}: not a safetensors index (expected a 'weight_map' object): {e}") from None
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
        for f in files:
            if not f.is_file():
                raise ConversionError(f"{index}: names shard {f.name!r}, which does not exist in {folder}")
        return files
    single = folder / SINGLE_FILE
    if not single.is_file():
        raise ConversionError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE} found")
    return [single]


def lazy_tensors(files: list[Path]) -> list[LazyTensor]:
    """Every tensor's name, shape and dtype from the headers; data is read on `load()`."""
    out = []
    for path in files:
        try:
            with safe_open(str(path), framework="numpy") as f:
                for name in f.keys():
                    meta = f.get_slice(name)
                    out.append(LazyTensor(name, tuple(meta.get_shape()), meta.get_dtype(), str(path),
                                          _loader(path, name)))
        except ConversionError:
            raise
        except Exception as e:  # safetensors raises its own error types for broken headers
            raise ConversionError(f"{path}: corrupt or unreadable safetensors file ({e})") from None
    return out


def _loader(path: Path, name: str):
    def load():
        try:
            with safe_open(str(path), framework="numpy") as f:
                return f.get_tensor(name)
        except Exception as e:
            raise ConversionError(f"{path}: cannot read tensor {name!r} ({e})") from None
    return load


def tokenizer_files(folder: Path) -> dict[str, bytes]:
    if not (folder / "tokenizer.json").is_file():
        raise ConversionError(f"{folder}: missing tokenizer.json (expected a fast tokenizer file beside config.json)")
    return {name: (folder / name).read_bytes() for name in TOKENIZER_FILES if (folder / name).is_file()}

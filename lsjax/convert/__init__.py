"""Conversion into lsjax checkpoints: Hugging Face safetensors folders and GGUF files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lsjax.checkpoint import as_dtype, save_model
from lsjax.config import ModelConfig
from lsjax.convert import hf
from lsjax.convert.assemble import LazyTensor, assemble, source_dtype
from lsjax.convert.export import export_hf, hf_config_dict
from lsjax.errors import CheckpointError

__all__ = ["convert_hf", "convert_gguf", "export_hf", "hf_config_dict", "LazyTensor", "assemble", "source_dtype"]


def _refuse_existing(out: str | Path) -> None:
    if Path(out).exists():  # checked before any work, and again atomically at the end
        raise CheckpointError(f"{Path(out).absolute()}: output path already exists; "
                              "choose another path or remove it first")


def convert_hf(folder: str | Path, out: str | Path, dtype: Any = None, progress: bool = True,
               allow_nonfinite: bool = False) -> Path:
    """HF folder (config.json, safetensors, tokenizer) -> lsjax checkpoint at `out` (weights holding
    NaN or Inf are refused unless `allow_nonfinite`)."""

    folder = Path(folder)
    _refuse_existing(out)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder (expected a Hugging Face model folder)")
    config, raw = hf.read_hf_config(folder)
    tokenizer = hf.tokenizer_files(folder)
    tensors = hf.lazy_tensors(hf.safetensors_files(folder))
    dtype = source_dtype(tensors) if dtype is None else as_dtype(dtype)
    params = assemble(config, tensors, dtype, progress=progress, allow_nonfinite=allow_nonfinite)
    return save_model(out, config, params, tokenizer, raw, {"kind": "hf", "path": str(folder.absolute())})


def convert_gguf(path: str | Path, out: str | Path, dtype: Any = "float32", progress: bool = True,
                 allow_nonfinite: bool = False) -> Path:
    """GGUF file (dequantised, q/k un-permuted, tokenizer from metadata) -> lsjax checkpoint.

    Needs the `gguf` extra; its reader is imported here so the rest of `lsjax.convert` runs without it."""
    from lsjax.convert.gguf import read_gguf

    _refuse_existing(out)
    gguf = read_gguf(path)
    config = ModelConfig.from_hf(gguf.config, source=str(path))
    tensors = [LazyTensor(name, shape, "float32", str(path), lambda name=name: gguf.tensor(name))
               for name, shape in gguf.tensor_shapes().items()]
    params = assemble(config, tensors, as_dtype(dtype), progress=progress, allow_nonfinite=allow_nonfinite)
    return save_model(out, config, params, gguf.tokenizer_files(), gguf.config,
                      {"kind": "gguf", "path": str(Path(path).absolute())})

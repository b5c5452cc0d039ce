"""Conversion into lsjax checkpoints: Hugging Face safetensors folders and GGUF files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lsjax.checkpoint import as_dtype, save_model
from lsjax.config import ModelConfig
from lsjax.convert import hf
from lsjax.convert.assemble import LazyTensor, assemble, hf_names, source_dtype
from lsjax.quant import NORMS, is_quantized, join, parse_spec, path_name, quantize_params
from lsjax.convert.export import export_hf, hf_config_dict
from lsjax.errors import CheckpointError

__all__ = ["convert_hf", "convert_gguf", "export_hf", "hf_config_dict", "LazyTensor", "assemble", "source_dtype"]


def _kept_blocks(config: ModelConfig, gguf, dtype: Any) -> dict[str, Any]:
    """The stored params with every matrix as the file's blocks (transposed to `[in, out]` where
    lsjax stores it so), the norms as floats."""
    params: dict[str, Any] = {}
    layers: dict[str, list[Any]] = {}
    for name, (key, layer, transpose) in hf_names(config).items():
        if key in NORMS:
            value = gguf.tensor(name).astype(dtype)
        else:
            value = gguf.quantized_tensor(name)
            value = value.T if transpose else value
        if layer is None:
            params[key] = value
        else:
            layers.setdefault(key, [None] * config.num_layers)[layer] = value
    params["layers"] = {key: join(values, jnp.stack) for key, values in layers.items()}
    return params


def _quantized(params: dict[str, Any], scheme: str, group: int | None) -> tuple[dict[str, Any], dict[str, float]]:
    """Stored float params with every matrix quantized, and each one's relative RMS error."""
    quantized = quantize_params(params, scheme, group)
    errors = {}

    def error(path, w, q):
        if is_quantized(q):
            w = np.asarray(w, np.float32)
            diff = np.asarray(q.dequantize(), np.float32) - w
            relative = np.mean(diff ** 2) / max(float(np.mean(w ** 2)), 1e-30)
            errors[path_name(path)] = float(np.sqrt(relative))

    jax.tree_util.tree_map_with_path(error, params, quantized, is_leaf=is_quantized)
    return quantized, errors


def _refuse_existing(out: str | Path) -> None:
    if Path(out).exists():  # checked before any work, and again atomically at the end
        raise CheckpointError(f"{Path(out).absolute()}: output path already exists; "
                              "choose another path or remove it first")


def convert_hf(folder: str | Path, out: str | Path, dtype: Any = None, progress: bool = True,
               allow_nonfinite: bool = False, quantize: str | None = None) -> Path:
    """HF folder (config.json, safetensors, tokenizer) -> lsjax checkpoint at `out` (weights holding
    NaN or Inf are refused unless `allow_nonfinite`). `quantize`: "int8" / "int4" (per channel) or
    "int8:G" / "int4:G" (groups of G): every weight matrix rounded to nearest (`lsjax.quant`), each
    one's relative RMS error written into the checkpoint's config."""

    folder = Path(folder)
    _refuse_existing(out)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder (expected a Hugging Face model folder)")
    config, raw = hf.read_hf_config(folder)
    tokenizer = hf.tokenizer_files(folder)
    tensors = hf.lazy_tensors(hf.safetensors_files(folder))
    spec = None if quantize is None else parse_spec(quantize)  # a bad spec is refused before any work
    dtype = source_dtype(tensors) if dtype is None else as_dtype(dtype)
    params = assemble(config, tensors, dtype, progress=progress, allow_nonfinite=allow_nonfinite)
    source = {"kind": "hf", "path": str(folder.absolute())}
    if spec is not None:
        params, source["quantization_error"] = _quantized(params, *spec)
    return save_model(out, config, params, tokenizer, raw, source)


def convert_gguf(path: str | Path, out: str | Path, dtype: Any = "float32", progress: bool = True,
                 allow_nonfinite: bool = False, keep_quantized: bool = False) -> Path:
    """GGUF file (dequantised, q/k un-permuted, tokenizer from metadata) -> lsjax checkpoint.
    `keep_quantized`: every weight matrix kept in its Q8_0 / Q4_0 / Q4_1 blocks, exactly
    (`lsjax.quant`; a matrix of any other type is refused, naming it); the norms in float.

    Needs the `gguf` extra; its reader is imported here so the rest of `lsjax.convert` runs without it."""
    from lsjax.convert.gguf import read_gguf

    _refuse_existing(out)
    gguf = read_gguf(path)
    config = ModelConfig.from_hf(gguf.config, source=str(path))
    if keep_quantized:
        params = _kept_blocks(config, gguf, as_dtype(dtype))
        return save_model(out, config, params, gguf.tokenizer_files(), gguf.config,
                          {"kind": "gguf", "path": str(Path(path).absolute()), "kept_quantized": True})
    tensors = [LazyTensor(name, shape, "float32", str(path), lambda name=name: gguf.tensor(name))
               for name, shape in gguf.tensor_shapes().items()]
    params = assemble(config, tensors, as_dtype(dtype), progress=progress, allow_nonfinite=allow_nonfinite)
    return save_model(out, config, params, gguf.tokenizer_files(), gguf.config,
                      {"kind": "gguf", "path": str(Path(path).absolute())})

"""Hugging Face tensor names -> the stored lsjax params: one name map plus per-tensor hooks.

Both importers (safetensors and GGUF) produce `LazyTensor`s under HF names; this module checks
every tensor (known name, expected shape, floating dtype), applies its hook (transpose `[out, in]`
to `[in, out]`) and writes it into its slot of a preallocated stacked buffer. Only one source
tensor is materialised at a time.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Iterable

import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from lsjax.checkpoint import stored_shapes
from lsjax.config import ModelConfig
from lsjax.errors import ConversionError

# HF per-layer suffix -> (lsjax layer weight, transpose from HF's [out, in])
LAYER_NAMES = {
    "input_layernorm.weight": ("attn_norm", False),
    "self_attn.q_proj.weight": ("q", True),
    "self_attn.k_proj.weight": ("k", True),
    "self_attn.v_proj.weight": ("v", True),
    "self_attn.o_proj.weight": ("o", True),
    "post_attention_layernorm.weight": ("mlp_norm", False),
    "mlp.gate_proj.weight": ("gate", True),
    "mlp.up_proj.weight": ("up", True),
    "mlp.down_proj.weight": ("down", True),
}
GLOBAL_NAMES = {
    "model.embed_tokens.weight": ("embed", False),
    "model.norm.weight": ("norm", False),
    "lm_head.weight": ("lm_head", True),
}
IGNORED = re.compile(r".*rotary_emb\.inv_freq$")
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")

FLOAT_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
                "float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


@dataclasses.dataclass
class LazyTensor:
    """A named source tensor whose data is read only by `load()`."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors ("F32", "BF16", ...) or numpy name
    origin: str  # file it comes from, for error messages
    load: Callable[[], np.ndarray]


def hf_names(config: ModelConfig) -> dict[str, tuple[str, int | None, bool]]:
    """Every HF tensor name the config expects -> (lsjax param, layer index or None, transpose)."""
    names = {}
    for i in range(config.num_layers):
        for suffix, (key, transpose) in LAYER_NAMES.items():
            names[f"model.layers.{i}.{suffix}"] = (key, i, transpose)
    for name, (key, transpose) in GLOBAL_NAMES.items():
        if key == "lm_head" and config.tie_word_embeddings:
            continue
        names[name] = (key, None, transpose)
    return names


def source_dtype(tensors: list[LazyTensor]) -> Any:
    """The one floating dtype of the checkpoint (float32 when mixed)."""
    kinds = {FLOAT_DTYPES.get(t.dtype) for t in tensors}
    return kinds.pop() if len(kinds) == 1 and None not in kinds else np.float32


def assemble(config: ModelConfig, tensors: Iterable[LazyTensor], dtype: Any,
             progress: bool = True, allow_nonfinite: bool = False) -> dict[str, Any]:
    """Check and stack source tensors into the stored lsjax params (numpy, `dtype`).

    A tensor holding NaN or Inf (in the source or after the cast to `dtype`) is refused by name:
    such a checkpoint is broken, and it would only show later as NaN logits. `allow_nonfinite`
    converts it anyway."""
    tensors = list(tensors)
    expected = hf_names(config)
    shapes = stored_shapes(config)
    params: dict[str, Any] = {"layers": {}}
    for key, shape in shapes.items():
        if key != "layers":
            params[key] = np.empty(shape, dtype)
    for key, shape in shapes["layers"].items():
        params["layers"][key] = np.empty(shape, dtype)

    seen = set()
    for t in tensors:
        if IGNORED.match(t.name):
            continue
        if t.name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # some tied checkpoints also store the head; the embedding is the truth
        if t.name not in expected:
            layer = _LAYER_RE.match(t.name)
            if layer and int(layer.group(1)) >= config.num_layers:
                why = f"layer {layer.group(1)} but num_hidden_layers={config.num_layers}"
            else:
                why = "not a Llama-family tensor lsjax knows"
            raise ConversionError(f"{t.origin}: unexpected tensor {t.name!r} ({why})")
        if t.name in seen:
            raise ConversionError(f"{t.origin}: tensor {t.name!r} appears twice")
        seen.add(t.name)
    missing = [n for n in expected if n not in seen]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        origins = sorted({t.origin for t in tensors}) or ["(no tensors)"]
        raise ConversionError(f"{', '.join(origins)}: missing tensor(s) {missing[:3]}{more}")

    for t in tqdm(tensors, desc="converting", unit="tensor", disable=not progress):
        if t.name not in expected:
            continue  # ignored buffers, or the duplicate tied head
        key, layer, transpose = expected[t.name]
        target = params["layers"][key] if layer is not None else params[key]
        slot_shape = target.shape[1:] if layer is not None else target.shape
        want = tuple(reversed(slot_shape)) if transpose else tuple(slot_shape)
        if tuple(t.shape) != want:
            raise ConversionError(f"{t.origin}: tensor {t.name!r} has shape {list(t.shape)}; "
                                  f"expected {list(want)} from the config")
        if t.dtype not in FLOAT_DTYPES:
            raise ConversionError(f"{t.origin}: tensor {t.name!r} has dtype {t.dtype}; "
                                  f"expected a floating dtype (F32, F16 or BF16)")
        value = np.asarray(t.load())
        if not allow_nonfinite:
            check_finite(t, value, dtype)
        if transpose:
            value = value.T
        with np.errstate(over="ignore", invalid="ignore"):  # checked above, or allowed
            if layer is None:
                target[...] = value.astype(dtype)
            else:
                target[layer] = value.astype(dtype)
    return params


def check_finite(tensor: LazyTensor, value: np.ndarray, dtype: Any) -> None:
    """Refuse a tensor with NaN or Inf, or one whose values overflow `dtype` (e.g. fp32 -> fp16)."""
    with np.errstate(over="ignore", invalid="ignore"):
        cast = value.astype(dtype)
    for data, where in ((value, ""), (cast, f" after the cast to {np.dtype(dtype).name}")):
        bad = ~np.isfinite(data.astype(np.float32))
        if bad.any():
            first = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ConversionError(f"{tensor.origin}: tensor {tensor.name!r} holds {int(bad.sum())} NaN or Inf "
                                  f"value(s){where} (the first at index {list(first)}); expected finite weights "
                                  f"(allow_nonfinite=True, or --allow-nonfinite, converts it anyway)")

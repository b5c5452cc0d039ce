"""Import a llama-architecture GGUF file (llama.cpp's format) as a Hugging Face Llama checkpoint.

A GGUF file holds three things lsjax needs, all under llama.cpp's names and conventions:

* the hyperparameters, as ``{arch}.*`` metadata keys  -> ``GGUFModel.config``, a ``config.json``-style
  dict for ``LlamaForCausalLM``;
* the weights, often block-quantised, under llama.cpp tensor names -> ``GGUFModel.tensors()``, float32
  numpy arrays under Hugging Face names, produced one at a time from the memory-mapped file;
* the tokenizer, as ``tokenizer.ggml.*`` vocabulary/merges/ids  -> ``GGUFModel.tokenizer_files()``,
  the JSON files a Hugging Face tokenizer folder holds.

Weight layout notes
-------------------
GGUF lists a tensor's dimensions fastest-varying first (ggml's ``ne[0]`` is the row length), so a
``[in, out]`` GGUF shape is a numpy ``(out, in)`` array, which is already Hugging Face's
``nn.Linear`` layout: no transpose is needed.

llama.cpp computes RoPE on adjacent pairs (x0, x1), (x2, x3)... while Hugging Face Llama rotates the
two halves of each head (x_j, x_{j+d/2}). So llama.cpp's converter permutes the rows of ``q_proj`` and
``k_proj`` per head::

    permute(w, n_head) = w.reshape(n_head, 2, d // 2, in).swapaxes(1, 2).reshape(out, in)

i.e. GGUF row ``h*d + 2*j + t`` holds HF row ``h*d + t*(d//2) + j``. The inverse, applied here, is::

    w.reshape(n_head, d // 2, 2, in).swapaxes(1, 2).reshape(out, in)

with ``n_head = num_attention_heads`` for q and ``num_key_value_heads`` for k.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
from collections.abc import Iterator
from typing import Any

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from lsjax.errors import ConversionError
from lsjax.extras import Extra, missing_extra
from lsjax.quant import QuantizedWeight, Scheme, from_blocks

try:
    import gguf
    from gguf import GGUFValueType
except ImportError as e:
    raise missing_extra(e, Extra.GGUF, "reading GGUF files") from None

GGUF_MAGIC = b"GGUF"
# block types held as they are (`GGUFModel.quantized_tensor`): groups of 32 along the input
KEPT_TYPES = {gguf.GGMLQuantizationType.Q8_0: Scheme.INT8, gguf.GGMLQuantizationType.Q4_0: Scheme.INT4,
              gguf.GGMLQuantizationType.Q4_1: Scheme.INT4}
SUPPORTED_ARCHITECTURES = ("llama", "mistral")

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
TOKEN_NORMAL = 1
TOKEN_UNKNOWN = 2
TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4
TOKEN_UNUSED = 5
TOKEN_BYTE = 6

_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# blk.{i}.<gguf> -> model.layers.{i}.<hf>.weight, in Hugging Face's state_dict order
_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
# tensors that carry config, not weights
_ROPE_FREQS = "rope_freqs.weight"

# Pre-tokenizer split rules by `tokenizer.ggml.pre` (the regexes llama.cpp and the original
# Hugging Face tokenizers use for these vocabularies).
_GPT2_PRE = ("gpt2", "mpt", "olmo", "jais", "trillion", "default")
_DIGITS_THEN_GPT2_PRE = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
_LLAMA3_PRE = ("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "smaug-bpe", "dbrx", "lfm2")
_TEKKEN_PRE = ("tekken",)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SUPPORTED_PRE_TOKENIZERS = _GPT2_PRE + _DIGITS_THEN_GPT2_PRE + _LLAMA3_PRE + _TEKKEN_PRE


@dataclasses.dataclass(frozen=True)
class _TensorPlan:
    hf_name: str
    gguf_name: str
    shape: tuple[int, ...]  # numpy / Hugging Face order
    rope_heads: int  # >0: undo llama.cpp's q/k RoPE row permutation with this many heads


@dataclasses.dataclass
class GGUFModel:
    """A parsed GGUF file. ``config`` is ready; weights and tokenizer are produced on demand."""

    path: pathlib.Path
    config: dict[str, Any]
    metadata: dict[str, Any] = dataclasses.field(repr=False)  # scalar metadata, llama.cpp keys
    _reader: Any = dataclasses.field(repr=False)
    _plan: list[_TensorPlan] = dataclasses.field(repr=False)

    @property
    def num_tensors(self) -> int:
        """How many tensors ``tensors()`` yields."""
        return len(self._plan)

    def tensor_names(self) -> list[str]:
        """Hugging Face names of the tensors ``tensors()`` yields, in the same order."""
        return [p.hf_name for p in self._plan]

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """``{hf_name: shape}`` of every tensor ``tensors()`` yields (all float32), without reading data."""
        return {p.hf_name: p.shape for p in self._plan}

    def tensor(self, hf_name: str) -> np.ndarray:
        """One tensor by Hugging Face name, dequantised (for building lazy loaders)."""
        plans = {p.hf_name: p for p in self._plan}
        if hf_name not in plans:
            raise ConversionError(f"{self.path}: no tensor {hf_name!r}; expected one of tensor_names()")
        return self._load(self._gguf_tensors[plans[hf_name].gguf_name], plans[hf_name])

    @functools.cached_property
    def _gguf_tensors(self) -> dict[str, Any]:
        return {t.name: t for t in self._reader.tensors}

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """Yield ``(hf_name, float32 array)`` one at a time, dequantised, in Hugging Face layout."""
        by_name = {t.name: t for t in self._reader.tensors}
        for plan in self._plan:
            yield plan.hf_name, self._load(by_name[plan.gguf_name], plan)

    def _load(self, tensor: Any, plan: _TensorPlan) -> np.ndarray:
        try:
            array = _dequantize(tensor)
        except ConversionError:
            raise
        except Exception as exc:  # any failure here is a bad file
            raise ConversionError(
                f"{self.path}: tensor {tensor.name!r} ({tensor.tensor_type.name}) could not be "
                f"dequantised: {exc}"
            ) from exc
        if array.size != math.prod(plan.shape):
            raise ConversionError(
                f"{self.path}: tensor {tensor.name!r} holds {array.size} values, expected shape "
                f"{plan.shape} for {plan.hf_name!r}"
            )
        array = array.reshape(plan.shape)
        if plan.rope_heads:
            array = _unpermute_rope_rows(array, plan.rope_heads)
        # Own the memory (F32 tensors would otherwise be read-only views of the memory map).
        return np.array(array, dtype=np.float32, order="C", copy=True)

    def quantized_tensor(self, hf_name: str) -> QuantizedWeight:
        """One tensor by Hugging Face name as the file stores it, `[out, in]` grouped along `in`
        (`lsjax.quant`): Q8_0, Q4_0 and Q4_1 blocks are held exactly (no rounding); any other type
        is an error naming it."""
        plans = {p.hf_name: p for p in self._plan}
        if hf_name not in plans:
            raise ConversionError(f"{self.path}: no tensor {hf_name!r}; expected one of tensor_names()")
        plan, tensor = plans[hf_name], self._gguf_tensors[plans[hf_name].gguf_name]
        kind = tensor.tensor_type
        if kind not in KEPT_TYPES:
            raise ConversionError(
                f"{self.path}: tensor {tensor.name!r} has type {kind.name}, which cannot be kept quantized; "
                f"expected one of {', '.join(k.name for k in KEPT_TYPES)} (convert without keeping it quantized)")
        raw = np.asarray(tensor.data, np.uint8)
        block, size = gguf.GGML_QUANT_SIZES[kind]
        if len(plan.shape) != 2 or plan.shape[-1] % block or raw.size != math.prod(plan.shape) // block * size:
            raise ConversionError(f"{self.path}: tensor {tensor.name!r} holds {raw.size} bytes of {kind.name} blocks; "
                                  f"expected shape {plan.shape} for {hf_name!r}")
        q, scale, offset = block_values(raw, kind, plan.shape)
        if plan.rope_heads:
            q, scale = _unpermute_rope_rows(q, plan.rope_heads), _unpermute_rope_rows(scale, plan.rope_heads)
            offset = None if offset is None else _unpermute_rope_rows(offset, plan.rope_heads)
        return from_blocks(q, scale, offset, KEPT_TYPES[kind], block, axis=-1)

    def tokenizer_files(self) -> dict[str, str]:
        """``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` as JSON text."""
        return _tokenizer_files(self.path, self._reader, self.metadata, self.config)

    def write_tokenizer(self, folder: str | os.PathLike[str]) -> pathlib.Path:
        """Write ``tokenizer_files()`` into ``folder`` (created if needed); return the folder."""
        folder = pathlib.Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in self.tokenizer_files().items():
            (folder / name).write_text(text, encoding="utf-8")
        return folder


# --------------------------------------------------------------------------------------------------
# reading


def read_gguf(path: str | os.PathLike[str]) -> GGUFModel:
    """Parse a llama/mistral-architecture GGUF file (header and metadata only; weights stay mapped)."""
    path = pathlib.Path(path)
    reader = _open_reader(path)
    metadata = _scalar_metadata(reader)

    arch = metadata.get("general.architecture")
    if arch is None:
        raise ConversionError(f"{path}: metadata key 'general.architecture' is missing; expected 'llama'")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ConversionError(
            f"{path}: general.architecture is {arch!r}; expected one of {list(SUPPORTED_ARCHITECTURES)} "
            "(a Llama-family decoder)"
        )
    if metadata.get(f"{arch}.expert_count", 0):
        raise ConversionError(
            f"{path}: {arch}.expert_count is {metadata[f'{arch}.expert_count']}; mixture-of-experts "
            "GGUF files are not supported (expected 0 or absent)"
        )

    tensors = {t.name: t for t in reader.tensors}
    config = _build_config(path, reader, metadata, arch, tensors)
    plan = _plan_tensors(path, config, tensors)
    return GGUFModel(path=path, config=config, metadata=metadata, _reader=reader, _plan=plan)


def _open_reader(path: pathlib.Path) -> Any:

    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        raise ConversionError(f"{path}: cannot read GGUF file: {exc}") from exc
    if magic != GGUF_MAGIC:
        raise ConversionError(
            f"{path}: not a GGUF file (first bytes {magic!r}, expected magic {GGUF_MAGIC!r})"
        )
    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # gguf raises ValueError/IndexError/... on bad headers
        raise ConversionError(
            f"{path}: GGUF header/metadata is unreadable, the file may be truncated or corrupt "
            f"({size} bytes): {exc}"
        ) from exc
    if reader.byte_order != "I":
        raise ConversionError(f"{path}: big-endian GGUF files are not supported; expected little-endian")
    for tensor in reader.tensors:
        end = int(tensor.data_offset) + int(tensor.n_bytes)
        if end > size:
            raise ConversionError(
                f"{path}: truncated GGUF file: tensor {tensor.name!r} ends at byte {end} but the file "
                f"has {size} bytes"
            )
    return reader


def _scalar_metadata(reader: Any) -> dict[str, Any]:
    """Every metadata value except the big tokenizer arrays, as plain Python values."""

    big = {"tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores"}
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key in big or key.startswith("GGUF."):
            continue
        value = field.contents()
        if field.types and field.types[0] == GGUFValueType.ARRAY and isinstance(value, list) and len(value) > 4096:
            continue  # some other large array: not needed here
        out[key] = _plain(value)
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _array_field(reader: Any, key: str) -> list[Any] | None:
    field = reader.fields.get(key)
    return None if field is None else _plain(field.contents())


def _require(path: pathlib.Path, metadata: dict[str, Any], key: str, kind: type, what: str) -> Any:
    if key not in metadata:
        raise ConversionError(f"{path}: metadata key {key!r} is missing; expected {what}")
    value = metadata[key]
    if kind is int and not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        raise ConversionError(f"{path}: metadata key {key!r} is {value!r}; expected {what}")
    if kind is float and not (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0):
        raise ConversionError(f"{path}: metadata key {key!r} is {value!r}; expected {what}")
    return kind(value)


def _numpy_shape(tensor: Any) -> tuple[int, ...]:
    # GGUF/ggml lists dims fastest-varying first; numpy wants them slowest first.
    return tuple(int(d) for d in reversed(list(tensor.shape)))


def _build_config(
    path: pathlib.Path, reader: Any, metadata: dict[str, Any], arch: str, tensors: dict[str, Any]
) -> dict[str, Any]:
    def key(name: str) -> str:
        return f"{arch}.{name}"

    hidden = _require(path, metadata, key("embedding_length"), int, "the hidden size (a positive integer)")
    layers = _require(path, metadata, key("block_count"), int, "the number of layers (a positive integer)")
    ffn = _require(path, metadata, key("feed_forward_length"), int, "the MLP width (a positive integer)")
    heads = _require(path, metadata, key("attention.head_count"), int, "the number of attention heads")
    context = _require(path, metadata, key("context_length"), int, "the training context length")
    eps = _require(
        path, metadata, key("attention.layer_norm_rms_epsilon"), float, "the RMSNorm epsilon (a positive float)"
    )
    kv_heads = heads
    if key("attention.head_count_kv") in metadata:
        kv_heads = _require(path, metadata, key("attention.head_count_kv"), int, "the number of KV heads")
    if heads % kv_heads:
        raise ConversionError(
            f"{path}: {key('attention.head_count_kv')} is {kv_heads}; expected a divisor of "
            f"{key('attention.head_count')} ({heads})"
        )
    head_dim = hidden // heads
    if key("attention.key_length") in metadata:
        head_dim = _require(path, metadata, key("attention.key_length"), int, "the attention head size")
    if metadata.get(key("attention.value_length"), head_dim) != head_dim:
        raise ConversionError(
            f"{path}: {key('attention.value_length')} is {metadata[key('attention.value_length')]}; expected "
            f"{head_dim} (equal to the key head size)"
        )
    if head_dim % 2:
        raise ConversionError(f"{path}: attention head size is {head_dim}; expected an even number for RoPE")
    rope_dims = metadata.get(key("rope.dimension_count"), head_dim)
    if rope_dims != head_dim:
        raise ConversionError(
            f"{path}: {key('rope.dimension_count')} is {rope_dims}; expected {head_dim} (RoPE over the whole "
            "head; partial rotary embeddings are not supported for Llama)"
        )
    rope_theta = float(metadata.get(key("rope.freq_base"), 10000.0))
    if not rope_theta > 0:
        raise ConversionError(f"{path}: {key('rope.freq_base')} is {rope_theta}; expected a positive float")

    if "token_embd.weight" not in tensors:
        raise ConversionError(f"{path}: tensor 'token_embd.weight' is missing; expected the token embedding")
    embd_shape = _numpy_shape(tensors["token_embd.weight"])
    vocab = metadata.get(key("vocab_size"))
    if vocab is None:
        vocab = embd_shape[0]
    if embd_shape != (vocab, hidden):
        raise ConversionError(
            f"{path}: tensor 'token_embd.weight' has shape {embd_shape}; expected ({vocab}, {hidden}) "
            "(vocab_size, hidden_size)"
        )

    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": eps,
        "rope_theta": rope_theta,
        "rope_scaling": _rope_scaling(path, reader, metadata, arch, tensors, rope_theta, head_dim),
        "max_position_embeddings": context,
        "vocab_size": vocab,
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }
    for name, gguf_key in (
        ("bos_token_id", "tokenizer.ggml.bos_token_id"),
        ("eos_token_id", "tokenizer.ggml.eos_token_id"),
        ("pad_token_id", "tokenizer.ggml.padding_token_id"),
    ):
        token_id = metadata.get(gguf_key)
        if token_id is not None and not 0 <= token_id < vocab:
            raise ConversionError(f"{path}: {gguf_key} is {token_id}; expected a token id in [0, {vocab})")
        config[name] = token_id
    return config


def _rope_scaling(
    path: pathlib.Path,
    reader: Any,
    metadata: dict[str, Any],
    arch: str,
    tensors: dict[str, Any],
    rope_theta: float,
    head_dim: int,
) -> dict[str, Any] | None:
    prefix = f"{arch}.rope.scaling."
    kind = metadata.get(prefix + "type")
    factor = metadata.get(prefix + "factor")
    if kind is None and metadata.get(f"{arch}.rope.scale_linear") is not None:  # older files
        kind, factor = "linear", metadata[f"{arch}.rope.scale_linear"]
    if _ROPE_FREQS in tensors:
        if kind not in (None, "none"):
            raise ConversionError(
                f"{path}: both tensor {_ROPE_FREQS!r} and {prefix}type={kind!r} are present; expected only one "
                "kind of RoPE scaling"
            )
        _check_supported_type(path, tensors[_ROPE_FREQS])
        factors = _dequantize(tensors[_ROPE_FREQS]).reshape(-1)
        return _llama3_rope_scaling(path, factors, rope_theta, head_dim)
    if kind in (None, "none"):
        return None
    if not isinstance(factor, (int, float)) or not factor > 0:
        raise ConversionError(f"{path}: {prefix}factor is {factor!r}; expected a positive float for {kind!r} RoPE")
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":
        original = metadata.get(prefix + "original_context_length")
        if original is None:
            raise ConversionError(
                f"{path}: metadata key {prefix + 'original_context_length'!r} is missing; expected it for YaRN RoPE"
            )
        scaling: dict[str, Any] = {
            "rope_type": "yarn",
            "factor": float(factor),
            "original_max_position_embeddings": int(original),
        }
        for gguf_name, hf_name in (
            ("yarn_beta_fast", "beta_fast"),
            ("yarn_beta_slow", "beta_slow"),
            ("attn_factor", "attention_factor"),
        ):
            if prefix + gguf_name in metadata:
                scaling[hf_name] = float(metadata[prefix + gguf_name])
        return scaling
    raise ConversionError(f"{path}: {prefix}type is {kind!r}; expected 'none', 'linear' or 'yarn'")


def _llama3_factors(
    rope_theta: float, head_dim: int, factor: float, low: float, high: float, original: float
) -> np.ndarray:
    """The per-frequency wavelength multipliers llama.cpp stores as ``rope_freqs.weight``."""
    inv_freq = 1.0 / (rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    wavelen = 2 * math.pi / inv_freq
    smooth = (original / wavelen - low) / (high - low)
    middle = 1.0 / ((1 - smooth) / factor + smooth)
    out = np.where(wavelen < original / high, 1.0, np.where(wavelen > original / low, factor, middle))
    return out


def _llama3_rope_scaling(path: pathlib.Path, factors: np.ndarray, rope_theta: float, head_dim: int) -> dict | None:
    """Recover Hugging Face's ``llama3`` rope_scaling from the multipliers in ``rope_freqs.weight``.

    The multipliers depend only on ``original/low`` and ``original/high``, so ``low_freq_factor`` is
    pinned to 1 (Llama 3.1/3.2's value) and the other two solved for; the result is verified by
    recomputing every multiplier.
    """
    factors = np.asarray(factors, dtype=np.float64)
    if factors.shape != (head_dim // 2,):
        raise ConversionError(
            f"{path}: tensor {_ROPE_FREQS!r} has {factors.size} values; expected {head_dim // 2} (head_dim / 2)"
        )
    if np.allclose(factors, 1.0):
        return None
    factor = float(factors.max())
    inv_freq = 1.0 / (rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    wavelen = 2 * math.pi / inv_freq
    middle = (factors > 1 + 1e-6) & (factors < factor * (1 - 1e-6))
    candidates = [(1.0, 4.0, 8192.0)]
    if middle.sum() >= 2 and factor > 1:
        # smooth = (1/r - 1/factor) / (1 - 1/factor) = a / wavelen + b,  a = L/(hi-lo), b = -lo/(hi-lo)
        smooth = (1 / factors[middle] - 1 / factor) / (1 - 1 / factor)
        a, b = np.polyfit(1 / wavelen[middle], smooth, 1)
        if a > 0 and b < 0:
            original = -a / b  # with low = 1
            high = (1 - b) / -b
            candidates.insert(0, (1.0, round(high, 4), float(round(original))))
    for low, high, original in candidates:
        expected = _llama3_factors(rope_theta, head_dim, factor, low, high, original)
        if np.allclose(expected, factors, rtol=1e-4, atol=1e-5):
            return {
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low,
                "high_freq_factor": high,
                "original_max_position_embeddings": int(original),
            }
    raise ConversionError(
        f"{path}: tensor {_ROPE_FREQS!r} does not match Llama 3 RoPE scaling (factor, low/high frequency "
        "factors, original context) for any parameters; expected llama.cpp's llama3 rope_freqs"
    )


def _plan_tensors(path: pathlib.Path, config: dict[str, Any], tensors: dict[str, Any]) -> list[_TensorPlan]:
    hidden = config["hidden_size"]
    ffn = config["intermediate_size"]
    heads = config["num_attention_heads"]
    kv_heads = config["num_key_value_heads"]
    head_dim = config["head_dim"]
    vocab = config["vocab_size"]

    wanted: list[_TensorPlan] = [_TensorPlan("model.embed_tokens.weight", "token_embd.weight", (vocab, hidden), 0)]
    layer_shapes = {
        "attn_q": ((heads * head_dim, hidden), heads),
        "attn_k": ((kv_heads * head_dim, hidden), kv_heads),
        "attn_v": ((kv_heads * head_dim, hidden), 0),
        "attn_output": ((hidden, heads * head_dim), 0),
        "ffn_gate": ((ffn, hidden), 0),
        "ffn_up": ((ffn, hidden), 0),
        "ffn_down": ((hidden, ffn), 0),
        "attn_norm": ((hidden,), 0),
        "ffn_norm": ((hidden,), 0),
    }
    for i in range(config["num_hidden_layers"]):
        for gguf_part, hf_part in _LAYER_TENSORS.items():
            shape, rope_heads = layer_shapes[gguf_part]
            wanted.append(
                _TensorPlan(f"model.layers.{i}.{hf_part}.weight", f"blk.{i}.{gguf_part}.weight", shape, rope_heads)
            )
    wanted.append(_TensorPlan("model.norm.weight", "output_norm.weight", (hidden,), 0))
    if not config["tie_word_embeddings"]:
        wanted.append(_TensorPlan("lm_head.weight", "output.weight", (vocab, hidden), 0))

    missing = [p.gguf_name for p in wanted if p.gguf_name not in tensors]
    if missing:
        raise ConversionError(
            f"{path}: {len(missing)} expected tensor(s) missing, e.g. {missing[:5]} (expected "
            f"{config['num_hidden_layers']} layers of {sorted(_LAYER_TENSORS)} plus token_embd/output_norm)"
        )
    known = {p.gguf_name for p in wanted} | {_ROPE_FREQS}
    unexpected = [name for name in tensors if name not in known]
    if unexpected:
        raise ConversionError(
            f"{path}: {len(unexpected)} unexpected tensor(s), e.g. {unexpected[:5]}; expected only a plain "
            "Llama decoder (no biases, experts or extra blocks)"
        )
    for plan in wanted:
        tensor = tensors[plan.gguf_name]
        got = _numpy_shape(tensor)
        if got != plan.shape:
            raise ConversionError(
                f"{path}: tensor {plan.gguf_name!r} has shape {got} (numpy order); expected {plan.shape} "
                f"for {plan.hf_name!r}"
            )
        _check_supported_type(path, tensor)
    return wanted


# --------------------------------------------------------------------------------------------------
# weights

_TYPE_SUPPORT: dict[int, bool] = {}


def _type_supported(tensor_type: Any) -> bool:
    """Whether gguf.quants can dequantise this type (probed once on a zero block)."""

    if tensor_type not in _TYPE_SUPPORT:
        if tensor_type == gguf.GGMLQuantizationType.F64:
            _TYPE_SUPPORT[tensor_type] = True
        else:
            block, type_size = gguf.GGML_QUANT_SIZES[tensor_type]
            try:
                gguf.quants.dequantize(np.zeros((1, type_size), dtype=np.uint8), tensor_type)
                _TYPE_SUPPORT[tensor_type] = True
            except NotImplementedError:
                _TYPE_SUPPORT[tensor_type] = False
    return _TYPE_SUPPORT[tensor_type]


def _check_supported_type(path: pathlib.Path, tensor: Any) -> None:
    if not _type_supported(tensor.tensor_type):
        raise ConversionError(
            f"{path}: tensor {tensor.name!r} has type {tensor.tensor_type.name}, which cannot be dequantised; "
            "expected a float (F32/F16/BF16) or a block-quantised type gguf.quants supports (Q4_0, Q8_0, Q4_K, ...)"
        )


def _dequantize(tensor: Any) -> np.ndarray:

    if tensor.tensor_type == gguf.GGMLQuantizationType.F64:
        return np.asarray(tensor.data).view(np.float64).astype(np.float32)
    return gguf.quants.dequantize(tensor.data, tensor.tensor_type)


def _halves(pairs: np.ndarray) -> np.ndarray:
    """float32 values of little-endian float16s stored as byte pairs `[..., 2]`."""
    return np.ascontiguousarray(pairs).view(np.float16)[..., 0].astype(np.float32)


def block_values(raw: np.ndarray, kind: Any,
                 shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """`(q, scale, offset)` of a `[rows, cols]` tensor's Q8_0 / Q4_0 / Q4_1 blocks `raw` (bytes), with
    w = scale * q + offset per block of 32 along a row (`lsjax.quant`'s form; offset None for Q8_0)."""
    block, size = gguf.GGML_QUANT_SIZES[kind]
    blocks = np.asarray(raw, np.uint8).reshape(shape[0], shape[1] // block, size)
    scale = _halves(blocks[..., 0:2])
    if kind == gguf.GGMLQuantizationType.Q8_0:
        return blocks[..., 2:].copy().view(np.int8).reshape(shape), scale, None
    # byte j of a 4-bit block holds element j (low nibble) and element j + 16 (high nibble)
    packed = blocks[..., 4:] if kind == gguf.GGMLQuantizationType.Q4_1 else blocks[..., 2:]
    q = np.concatenate([packed & 0xF, packed >> 4], axis=-1).reshape(shape)
    offset = _halves(blocks[..., 2:4]) if kind == gguf.GGMLQuantizationType.Q4_1 else -8.0 * scale
    return q, scale, offset


def _unpermute_rope_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's ``permute(w, n_head)``: interleaved-pair RoPE rows -> rotate-half rows."""
    out_dim = weight.shape[0]
    half = out_dim // n_head // 2
    return weight.reshape(n_head, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


# --------------------------------------------------------------------------------------------------
# tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (printable Latin-1 bytes keep their character)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    mapping = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _pre_tokenizer(path: pathlib.Path, pre: str) -> Any:
    if pre in _GPT2_PRE:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pre in _DIGITS_THEN_GPT2_PRE:
        # llama.cpp: split on each \p{N} first, then GPT-2's regex (as SmolLM/StarCoder's tokenizer.json)
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
            ]
        )
    if pre in _LLAMA3_PRE or pre in _TEKKEN_PRE:
        split = _LLAMA3_SPLIT if pre in _LLAMA3_PRE else _TEKKEN_SPLIT
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
            ]
        )
    raise ConversionError(
        f"{path}: tokenizer.ggml.pre is {pre!r}; expected one of {sorted(SUPPORTED_PRE_TOKENIZERS)}"
    )


def _tokenizer_files(
    path: pathlib.Path, reader: Any, metadata: dict[str, Any], config: dict[str, Any]
) -> dict[str, str]:
    kind = metadata.get("tokenizer.ggml.model")
    if kind is None:
        raise ConversionError(f"{path}: metadata key 'tokenizer.ggml.model' is missing; expected 'gpt2'")
    if kind != "gpt2":
        raise ConversionError(
            f"{path}: tokenizer.ggml.model is {kind!r}; expected 'gpt2' (byte-level BPE; SentencePiece "
            "'llama' vocabularies are not supported)"
        )
    tokens = _array_field(reader, "tokenizer.ggml.tokens")
    merges = _array_field(reader, "tokenizer.ggml.merges")
    if not tokens:
        raise ConversionError(f"{path}: metadata key 'tokenizer.ggml.tokens' is missing; expected the vocabulary")
    if merges is None:
        raise ConversionError(f"{path}: metadata key 'tokenizer.ggml.merges' is missing; expected BPE merges")
    types = _array_field(reader, "tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise ConversionError(
            f"{path}: tokenizer.ggml.token_type has {len(types)} entries; expected {len(tokens)} (one per token)"
        )
    if len(tokens) > config["vocab_size"]:
        raise ConversionError(
            f"{path}: tokenizer.ggml.tokens has {len(tokens)} tokens; expected at most vocab_size "
            f"{config['vocab_size']}"
        )

    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab: dict[str, int] = {}
    for index, (token, token_type) in enumerate(zip(tokens, types)):
        if token_type not in (TOKEN_CONTROL, TOKEN_USER_DEFINED) and not set(token) <= alphabet:
            token = "".join(spelling[b] for b in token.encode("utf-8"))
        vocab.setdefault(token, index)  # a duplicate spelling could never be produced anyway
    pairs = []
    for number, merge in enumerate(merges):
        parts = merge.split(" ")
        if len(parts) != 2:
            raise ConversionError(
                f"{path}: tokenizer.ggml.merges[{number}] is {merge!r}; expected two tokens separated by one space"
            )
        pairs.append((parts[0], parts[1]))

    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    pre = metadata.get("tokenizer.ggml.pre", "gpt2")
    tokenizer.pre_tokenizer = _pre_tokenizer(path, pre)
    tokenizer.decoder = decoders.ByteLevel()

    control = [
        AddedToken(tok, special=True, normalized=False, single_word=False, lstrip=False, rstrip=False)
        for tok, t in zip(tokens, types)
        if t == TOKEN_CONTROL
    ]
    user = [
        AddedToken(tok, special=False, normalized=False, single_word=False, lstrip=False, rstrip=False)
        for tok, t in zip(tokens, types)
        if t == TOKEN_USER_DEFINED
    ]
    if control:
        tokenizer.add_special_tokens(control)
    if user:
        tokenizer.add_tokens(user)

    def token_for(gguf_key: str) -> str | None:
        token_id = metadata.get(gguf_key)
        if token_id is None:
            return None
        if not 0 <= token_id < len(tokens):
            raise ConversionError(f"{path}: {gguf_key} is {token_id}; expected a token id in [0, {len(tokens)})")
        return tokens[token_id]

    bos_id = metadata.get("tokenizer.ggml.bos_token_id")
    eos_id = metadata.get("tokenizer.ggml.eos_token_id")

    bos = token_for("tokenizer.ggml.bos_token_id")
    eos = token_for("tokenizer.ggml.eos_token_id")
    unk = token_for("tokenizer.ggml.unknown_token_id")
    pad = token_for("tokenizer.ggml.padding_token_id")
    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", pre in _LLAMA3_PRE))
    add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False))
    if add_bos and bos is None:
        raise ConversionError(
            f"{path}: tokenizer.ggml.add_bos_token is true but tokenizer.ggml.bos_token_id is missing"
        )
    if add_eos and eos is None:
        raise ConversionError(
            f"{path}: tokenizer.ggml.add_eos_token is true but tokenizer.ggml.eos_token_id is missing"
        )

    single, pair, specials = ["$A:0"], ["$A:0", "$B:1"], []
    if add_bos:
        single, pair = [f"{bos}:0", *single], [f"{bos}:0", "$A:0", f"{bos}:1", "$B:1"]
        specials.append((bos, bos_id))
    if add_eos:
        single = [*single, f"{eos}:0"]
        pair = [*pair[: pair.index("$B:1")], f"{eos}:0", *pair[pair.index("$B:1") :], f"{eos}:1"]
        if eos != bos:
            specials.append((eos, eos_id))
    tokenizer.post_processor = processors.TemplateProcessing(
        single=" ".join(single), pair=" ".join(pair), special_tokens=specials
    )

    special_map: dict[str, Any] = {
        name: value
        for name, value in (("bos_token", bos), ("eos_token", eos), ("unk_token", unk), ("pad_token", pad))
        if value is not None
    }
    named = set(special_map.values())
    extra = [t.content for t in control if t.content not in named]
    if extra:
        special_map["additional_special_tokens"] = extra

    tokenizer_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": unk,
        "pad_token": pad,
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
    }
    if extra:
        tokenizer_config["additional_special_tokens"] = extra
    chat_template = metadata.get("tokenizer.chat_template")
    if chat_template is not None:
        tokenizer_config["chat_template"] = chat_template

    return {
        "tokenizer.json": tokenizer.to_str(pretty=False),
        "tokenizer_config.json": json.dumps(tokenizer_config, indent=2, ensure_ascii=False),
        "special_tokens_map.json": json.dumps(special_map, indent=2, ensure_ascii=False),
    }

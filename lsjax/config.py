"""`ModelConfig`: the typed, validated description of a Llama-family decoder.

Built from a Hugging Face `config.json` (either the transformers 4 `rope_theta`/`rope_scaling`
keys or the transformers 5 `rope_parameters` dict). Anything lsjax cannot run exactly is refused
here, at load time, with the field and the supported values named.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from lsjax.errors import ConfigError
from lsjax.validate import check

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
SUPPORTED_ACTIVATIONS = ("silu",)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
# Projections that read the same input run as one product (one weight, members side by side).
PROJECTION_GROUPS: dict[str, tuple[str, ...]] = {"qkv": ("q", "k", "v"), "o": ("o",), "gate_up": ("gate", "up"),
                                                 "down": ("down",)}


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding in HF's rotate-half layout, with optional linear or llama3 scaling."""

    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(
                f"rope_scaling type {self.type!r} is not supported; expected one of {SUPPORTED_ROPE_TYPES}")
        check(self.theta > 0, "rope_theta", self.theta, "a positive number")
        check(self.factor > 0, "rope_scaling.factor", self.factor, "a positive number")
        if self.type == "llama3":
            check(self.high_freq_factor > self.low_freq_factor, "rope_scaling.high_freq_factor",
                   self.high_freq_factor, f"greater than low_freq_factor={self.low_freq_factor}")

    def inverse_frequencies(self, head_dim: int) -> np.ndarray:
        """Per-pair rotation frequencies [head_dim // 2] (float64; positions are multiplied in)."""
        inv = 1.0 / self.theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
        if self.type == "linear":
            return inv / self.factor
        if self.type == "llama3":
            old = self.original_max_position_embeddings
            low_wavelen, high_wavelen = old / self.low_freq_factor, old / self.high_freq_factor
            wavelen = 2 * math.pi / inv
            scaled = np.where(wavelen > low_wavelen, inv / self.factor, inv)
            smooth = (old / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
            blended = (1 - smooth) * scaled / self.factor + smooth * scaled
            medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
            return np.where(medium, blended, scaled)
        return inv


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes and numerics of a Llama-family decoder (Llama 2/3, Mistral, SmolLM2, TinyLlama)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope: RopeConfig = dataclasses.field(default_factory=RopeConfig)
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        if isinstance(self.eos_token_id, list):  # JSON lists; a tuple keeps the config hashable (jit-static)
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"model_type {self.model_type!r} is not supported; expected one of {SUPPORTED_MODEL_TYPES}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            check(isinstance(value, int) and value > 0, name, value, "a positive integer")
        check(self.num_heads % self.num_kv_heads == 0, "num_key_value_heads", self.num_kv_heads,
               f"a divisor of num_attention_heads={self.num_heads}")
        check(self.head_dim % 2 == 0, "head_dim", self.head_dim, "an even number (RoPE rotates pairs)")
        check(self.rms_norm_eps > 0, "rms_norm_eps", self.rms_norm_eps, "a positive number")
        if self.sliding_window is not None:
            check(isinstance(self.sliding_window, int) and self.sliding_window > 0, "sliding_window",
                   self.sliding_window, "a positive integer or null")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        return self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)

    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        """(d_in, d_out) of each of the seven linear projections in one layer (y = x @ W)."""
        d, f = self.hidden_size, self.intermediate_size
        return {"q": (d, self.q_size), "k": (d, self.kv_size), "v": (d, self.kv_size),
                "o": (self.q_size, d), "gate": (d, f), "up": (d, f), "down": (f, d)}

    def shape_summary(self) -> str:
        """The shapes that decide whether weights made for one config fit another (error messages)."""
        return (f"hidden_size={self.hidden_size}, layers={self.num_layers}, heads={self.num_heads}/"
                f"{self.num_kv_heads}, intermediate={self.intermediate_size}, vocab={self.vocab_size}")

    def group_shapes(self) -> dict[str, tuple[int, int]]:
        """(d_in, d_out) of each projection group: the projections of one input side by side."""
        shapes = self.projection_shapes()
        return {group: (shapes[members[0]][0], sum(shapes[m][1] for m in members))
                for group, members in PROJECTION_GROUPS.items()}

    def member_columns(self, group: str) -> dict[str, tuple[int, int]]:
        """Each member's (first column, width) in its group's output."""
        shapes, start, out = self.projection_shapes(), 0, {}
        for member in PROJECTION_GROUPS[group]:
            out[member] = (start, shapes[member][1])
            start += shapes[member][1]
        return out

    # -- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown ModelConfig field(s) {sorted(unknown)}; expected a subset of {sorted(known)}")
        data["rope"] = RopeConfig(**data.get("rope", {}))
        return cls(**data)

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """Translate a Hugging Face config dict, refusing features lsjax does not implement."""
        where = f"{source}: "

        def need(key):
            if key not in hf:
                raise ConfigError(f"{where}missing required field {key!r}")
            return hf[key]

        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"{where}model_type {model_type!r} is not supported; "
                              f"expected one of {SUPPORTED_MODEL_TYPES} (Llama family)")
        act = hf.get("hidden_act", "silu")
        if act not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(f"{where}hidden_act {act!r} is not supported; expected one of {SUPPORTED_ACTIVATIONS}")
        for flag in ("attention_bias", "mlp_bias"):
            if hf.get(flag):
                raise ConfigError(f"{where}{flag}=true is not supported; expected false (no projection biases)")
        if hf.get("pretraining_tp", 1) not in (1, None):
            raise ConfigError(f"{where}pretraining_tp={hf['pretraining_tp']} is not supported; expected 1")
        try:
            num_heads = int(need("num_attention_heads"))
            hidden = int(need("hidden_size"))
            head_dim = hf.get("head_dim") or hidden // num_heads
            sliding = hf.get("sliding_window") if model_type == "mistral" else None
            if hf.get("use_sliding_window") is False:
                sliding = None
            return cls(
                vocab_size=int(need("vocab_size")),
                hidden_size=hidden,
                intermediate_size=int(need("intermediate_size")),
                num_layers=int(need("num_hidden_layers")),
                num_heads=num_heads,
                num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
                head_dim=int(head_dim),
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                rope=_rope_from_hf(hf, where),
                max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                sliding_window=None if sliding is None else int(sliding),
                model_type=model_type,
                bos_token_id=hf.get("bos_token_id"),
                eos_token_id=hf.get("eos_token_id"),
                pad_token_id=hf.get("pad_token_id"),
            )
        except ConfigError as e:
            if str(e).startswith(where):
                raise
            raise ConfigError(f"{where}{e}") from None


def _rope_from_hf(hf: dict[str, Any], where: str) -> RopeConfig:
    # transformers 5 writes `rope_parameters` (theta inside); transformers 4 `rope_theta` + `rope_scaling`.
    params = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or {}
    params = {**scaling, **params} if params else dict(scaling)
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"{where}rope_scaling type {rope_type!r} is not supported; "
                          f"expected one of {SUPPORTED_ROPE_TYPES}")
    kwargs: dict[str, Any] = {"theta": float(theta), "type": rope_type}
    if rope_type in ("linear", "llama3"):
        if "factor" not in params:
            raise ConfigError(f"{where}rope_scaling of type {rope_type!r} is missing field 'factor'")
        kwargs["factor"] = float(params["factor"])
    if rope_type == "llama3":
        for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if key not in params:
                raise ConfigError(f"{where}rope_scaling of type 'llama3' is missing field {key!r}")
            kwargs[key] = type(getattr(RopeConfig, key))(params[key])
    return RopeConfig(**kwargs)




SHAPES: dict[str, dict[str, Any]] = {  # random-weight shapes for benchmarks (no checkpoint needed)
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                      num_kv_heads=32, head_dim=128, max_position_embeddings=4096),
    "mistral-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                       num_kv_heads=8, head_dim=128, max_position_embeddings=32768, model_type="mistral",
                       sliding_window=4096),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                         num_kv_heads=3, head_dim=64, max_position_embeddings=8192, tie_word_embeddings=True,
                         rope={"theta": 100000.0}),
    # a few MB: rehearsing the GPU script on a CPU runs every step at this shape
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4, num_kv_heads=2,
                 head_dim=16, max_position_embeddings=1024),
}


def named_config(name: str) -> ModelConfig:
    """The `ModelConfig` of a named shape in `SHAPES` (e.g. "llama2-7b"), refusing unknown names."""
    if name not in SHAPES:
        raise ConfigError(f"--shape {name!r} is not known; expected one of {sorted(SHAPES)}")
    return ModelConfig.from_dict(SHAPES[name])

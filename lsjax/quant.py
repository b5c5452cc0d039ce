"""Quantized weights: integers in groups along the axis a product contracts, a scale (and for 4-bit
an offset) per group and column.

A `QuantizedWeight` stands for the float array it replaces, in that array's layout: a projection
`[..., d_in, N]` groups along d_in (`axis=-2`); a tied embedding `[V, D]`, whose transpose the
vocabulary head multiplies, groups along D (`axis=-1`). Within a group of `group` values

    w = scale * q + offset

- `Scheme.INT8`: q int8 in [-127, 127], no offset (symmetric). Per-channel int8 is group = d_in;
  GGUF's Q8_0 is group 32.
- `Scheme.INT4`: q in [0, 15], two per byte along the group axis (even index in the low nibble),
  with an offset: GGUF's Q4_1 (offset = its min) and Q4_0 (offset = -8 * scale) hold exactly.

Decoding reads weight bytes every token; the integers are a quarter (int8) or an eighth (4-bit) of
fp32's, plus a scale (and offset) per group. `dequantize` is the reference every product is checked
against; `product` is XLA's form (the dequantization is elementwise on the product's operand).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lsjax.errors import ConfigError


class Scheme(enum.StrEnum):
    INT8 = "int8"
    INT4 = "int4"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """`q` (int8, or uint8 holding two 4-bit values), `scale` and `offset` (None for int8) with the
    group axis shortened to groups: `[..., d_in / group, N]` (axis -2) or `[..., M, D / group]` (axis -1)."""

    q: jax.Array
    scale: jax.Array
    offset: jax.Array | None
    scheme: Scheme = dataclasses.field(metadata=dict(static=True))
    group: int = dataclasses.field(metadata=dict(static=True))
    axis: int = dataclasses.field(default=-2, metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, ...]:
        shape = list(self.q.shape)
        if self.scheme == Scheme.INT4:
            shape[self.axis] *= 2
        return tuple(shape)

    @property
    def ndim(self) -> int:
        return self.q.ndim

    @property
    def dtype(self):
        """The float type it dequantizes to (its scales')."""
        return self.scale.dtype

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in (self.q, self.scale, self.offset) if x is not None)

    def dequantize(self, dtype: Any = None) -> jax.Array:
        """The float array it stands for (in `dtype`, default its scales' type)."""
        dtype = dtype or self.scale.dtype
        q = _unpack(self.q, self.axis) if self.scheme == Scheme.INT4 else self.q
        grouped = _grouped(q, self.axis, self.group).astype(dtype)
        w = grouped * _expand(self.scale, self.axis).astype(dtype)
        if self.offset is not None:
            w = w + _expand(self.offset, self.axis).astype(dtype)
        return w.reshape(q.shape)

    @property
    def T(self) -> "QuantizedWeight":
        """The transpose of the last two axes (groups follow their axis: -2 <-> -1)."""
        q, scale, offset = (None if x is None else x.swapaxes(-1, -2) for x in (self.q, self.scale, self.offset))
        return QuantizedWeight(q, scale, offset, self.scheme, self.group, -1 if self.axis == -2 else -2)

    def parts(self) -> dict[str, Any]:
        """Its arrays by name (a checkpoint's tree); `from_parts` reverses it."""
        out = {"q": self.q, "scale": self.scale}
        return out if self.offset is None else {**out, "offset": self.offset}

    def layout(self) -> dict[str, Any]:
        """What `parts` leaves out: scheme, group and axis (a checkpoint's config)."""
        return {"scheme": self.scheme.value, "group": self.group, "axis": self.axis}

    @classmethod
    def from_parts(cls, parts: dict[str, Any], layout: dict[str, Any]) -> "QuantizedWeight":
        return cls(parts["q"], parts["scale"], parts.get("offset"), Scheme(layout["scheme"]), int(layout["group"]),
                   int(layout["axis"]))

    def rows(self, ids: jax.Array, dtype: Any = None) -> jax.Array:
        """Rows `ids` of a weight grouped along its last axis (an embedding's lookup), `[*ids.shape,
        D]`: only the rows taken are dequantized."""
        if self.axis != -1 or self.ndim != 2:
            raise ConfigError(f"rows() takes rows of a [V, D] weight grouped along D; this one is {self.shape} "
                              f"grouped along axis {self.axis}")
        taken = QuantizedWeight(jnp.take(self.q, ids, axis=0), jnp.take(self.scale, ids, axis=0),
                                None if self.offset is None else jnp.take(self.offset, ids, axis=0),
                                self.scheme, self.group, -1)
        return taken.dequantize(dtype)


def _unpack(packed: jax.Array, axis: int) -> jax.Array:
    low, high = packed & 0xF, packed >> 4
    both = jnp.stack([low, high], axis=axis)  # [.., K/2, 2, N] (axis -2) or [.., M, K/2, 2] (axis -1)
    shape = list(packed.shape)
    shape[axis] *= 2
    return both.reshape(shape)


def _pack(q: jax.Array, axis: int) -> jax.Array:
    q = jnp.moveaxis(q.astype(jnp.uint8), axis, -1)
    packed = q[..., 0::2] | (q[..., 1::2] << 4)
    return jnp.moveaxis(packed, -1, axis)


def _grouped(q: jax.Array, axis: int, group: int) -> jax.Array:
    """`q` with its group axis split into (groups, group)."""
    shape = list(q.shape)
    a = q.ndim + axis
    return q.reshape(*shape[:a], shape[a] // group, group, *shape[a + 1:])


def _expand(per_group: jax.Array, axis: int) -> jax.Array:
    """A `[.., groups, ..]` array made to broadcast against `_grouped`'s `[.., groups, group, ..]`."""
    return jnp.expand_dims(per_group, per_group.ndim + axis + 1)


def check_quantizable(name: str, shape: tuple[int, ...], scheme: Scheme | str, group: int, axis: int = -2) -> Scheme:
    """The scheme, once `shape` can be quantized in groups of `group` along `axis` (else a clear error)."""
    try:
        scheme = Scheme(scheme)
    except ValueError:
        raise ConfigError(f"quantization {scheme!r} is not supported; expected one of "
                          f"{', '.join(s.value for s in Scheme)}", "quantize") from None
    if len(shape) < 2 or axis not in (-1, -2):
        raise ConfigError(f"{name}: a quantized weight is a matrix grouped along axis -2 or -1; got shape {shape} "
                          f"and axis {axis}", "quantize")
    size = shape[axis]
    if not isinstance(group, int) or group < 1 or size % group:
        raise ConfigError(f"{name}: group size {group} does not divide its {size} input values (shape {shape}); "
                          f"choose a divisor of {size}", "quantize")
    if scheme == Scheme.INT4 and group % 2:
        raise ConfigError(f"{name}: 4-bit values are packed in pairs, so the group size must be even; got {group}",
                          "quantize")
    return scheme


def quantize(w: Any, scheme: Scheme | str, group: int | None = None, *, axis: int = -2,
             name: str = "weight") -> QuantizedWeight:
    """`w` rounded to nearest in groups of `group` along `axis` (default: the whole axis, per
    channel). int8: scale = max |w| / 127; 4-bit: scale = (max - min) / 15, offset = min. Computed
    in fp32 where `w` lives (on a GPU, a 7B model's weights never leave it); the scales and offsets
    keep `w`'s float type (fp32 for others), so a bf16 model still computes in bf16."""
    w = jnp.asarray(w)
    group = w.shape[axis] if group is None else group
    scheme = check_quantizable(name, w.shape, scheme, group, axis)
    dtype = w.dtype if jnp.issubdtype(w.dtype, jnp.floating) and w.dtype.itemsize <= 4 else jnp.float32
    q, scale, offset = _rounded(w, scheme, group, axis)
    return QuantizedWeight(q, scale.astype(dtype), None if offset is None else offset.astype(dtype), scheme, group,
                           axis)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _rounded(w: jax.Array, scheme: Scheme, group: int, axis: int):
    """(integers, scale, offset or None) of `w` in groups of `group` along `axis`, in fp32."""
    grouped = _grouped(w.astype(jnp.float32), axis, group)
    reduce = grouped.ndim + axis  # the within-group axis of grouped
    if scheme == Scheme.INT8:
        scale = jnp.max(jnp.abs(grouped), axis=reduce) / 127.0
        safe = jnp.where(scale == 0, 1.0, scale)
        q = jnp.clip(jnp.rint(grouped / jnp.expand_dims(safe, reduce)), -127, 127).astype(jnp.int8)
        return q.reshape(w.shape), scale, None
    low, high = jnp.min(grouped, axis=reduce), jnp.max(grouped, axis=reduce)
    scale = (high - low) / 15.0
    safe = jnp.where(scale == 0, 1.0, scale)
    q = jnp.clip(jnp.rint((grouped - jnp.expand_dims(low, reduce)) / jnp.expand_dims(safe, reduce)), 0, 15)
    return _pack(q.reshape(w.shape), axis), scale, low


def from_blocks(q: np.ndarray, scale: np.ndarray, offset: np.ndarray | None, scheme: Scheme | str,
                group: int, axis: int = -2) -> QuantizedWeight:
    """A weight from integers already quantized (a file's blocks): `q` unpacked, in the weight's
    layout (int8 values, or 4-bit values in [0, 15]); `scale` / `offset` per group."""
    scheme = check_quantizable("blocks", q.shape, scheme, group, axis)
    if scheme == Scheme.INT8:
        data = jnp.asarray(np.asarray(q, np.int8))
    else:
        q = np.asarray(q)
        if q.min(initial=0) < 0 or q.max(initial=0) > 15:
            raise ConfigError(f"4-bit values must lie in [0, 15]; got [{q.min()}, {q.max()}]", "quantize")
        data = jnp.asarray(_pack(q, axis))
    return QuantizedWeight(data, jnp.asarray(scale, jnp.float32),
                           None if offset is None else jnp.asarray(offset, jnp.float32), scheme, group, axis)


def join(weights: list[Any], how) -> Any:
    """`how` (e.g. `np.stack`, a concatenation) applied to each part of `weights` alike: float
    arrays, or quantized weights of one scheme, group and axis (else a clear error)."""
    if not any(isinstance(w, QuantizedWeight) for w in weights):
        return how(weights)
    kinds = {(w.scheme, w.group, w.axis) if isinstance(w, QuantizedWeight) else "float" for w in weights}
    if len(kinds) > 1:
        raise ConfigError(f"weights joined into one array must be quantized alike; got {sorted(map(str, kinds))}",
                          "quantize")
    return jax.tree.map(lambda *parts: how(list(parts)), *weights)


def parse_spec(spec: str) -> tuple[Scheme, int | None]:
    """`int8` / `int4` (per channel) or `int8:G` / `int4:G` (groups of G) -> (scheme, group)."""
    name, _, group = str(spec).partition(":")
    try:
        scheme = Scheme(name)
    except ValueError:
        raise ConfigError(f"quantize={spec!r}: {name!r} is not a quantization; expected int8 or int4, optionally "
                          f"with a group size (int4:32)", "quantize") from None
    if not group:
        return scheme, None
    if not group.isdigit() or int(group) < 1:
        raise ConfigError(f"quantize={spec!r}: group size {group!r} is not a positive integer", "quantize")
    return scheme, int(group)


def is_quantized(w: Any) -> bool:
    return isinstance(w, QuantizedWeight)


def product(x: jax.Array, w: jax.Array | QuantizedWeight) -> jax.Array:
    """x @ w, for a float or a quantized `w [..., K, N]` (dequantized in x's type, as one expression)."""
    if isinstance(w, QuantizedWeight):
        if w.axis != -2:
            raise ConfigError(f"a product contracts a weight's axis -2; this quantized weight groups along {w.axis}")
        return x @ w.dequantize(x.dtype)
    return x @ w


def dequantized(tree: Any) -> Any:
    """`tree` with every `QuantizedWeight` replaced by the float array it stands for."""
    return jax.tree.map(lambda w: w.dequantize() if isinstance(w, QuantizedWeight) else w, tree,
                        is_leaf=is_quantized)


def quantization(tree: Any) -> str | None:
    """How `tree`'s weights are quantized, as `scheme:group` of each kind present (e.g. "int4:32,
    int8:32"), or None when none is."""
    kinds = sorted({f"{w.scheme.value}:{w.group}" for w in jax.tree.leaves(tree, is_leaf=is_quantized)
                    if isinstance(w, QuantizedWeight)})
    return ",".join(kinds) or None


NORMS = ("attn_norm", "mlp_norm", "norm")  # vectors (stacked: [L, D]), kept in float


def quantize_params(params: Any, scheme: Scheme | str, group: int | None = None) -> Any:
    """A model's params (`lsjax.model`'s layout) with every weight matrix quantized in groups of
    `group` (default: per channel): the layers' projection groups and an untied head along their
    input (axis -2); the embedding along D (axis -1: the tied head contracts D, and a lookup takes
    whole rows). The norms stay float."""

    def one(path, leaf):
        last = _key(path[-1])
        if last in NORMS or isinstance(leaf, QuantizedWeight):
            return leaf
        return quantize(leaf, scheme, group, axis=-1 if last == "embed" else -2, name=path_name(path))

    return jax.tree_util.tree_map_with_path(one, params, is_leaf=is_quantized)


def _key(entry: Any) -> str:
    return str(getattr(entry, "key", getattr(entry, "idx", getattr(entry, "name", entry))))


def path_name(path: tuple[Any, ...]) -> str:
    """A tree path as the name a checkpoint's config and error messages use (`embed`, `layers/q`)."""
    return "/".join(_key(entry) for entry in path)


def refuse_quantized(params: Any, why: str) -> None:
    """A clear error where float weights are needed (`why`) and `params` holds quantized ones."""
    kinds = quantization(params)
    if kinds:
        raise ConfigError(f"{why}, and these weights are quantized ({kinds}); use the float checkpoint they were "
                          f"made from (or lsjax.quant.dequantized)", "params")

"""The lsjax model checkpoint: orbax params + model config + tokenizer files, written atomically.

Layout of a checkpoint folder:
    lsjax_config.json   {"format": "lsjax-model", "version": 1, "model": ModelConfig, "source": ...}
    hf_config.json      the source config.json (for export back to Hugging Face)
    tokenizer/          tokenizer.json, tokenizer_config.json, ...
    params/             orbax (StandardCheckpointer) tree: embed, layers/{q,k,...}, norm[, lm_head]

A quantized weight (`lsjax.quant.QuantizedWeight`) is stored as its parts (`q`, `scale`[, `offset`])
under its name, its scheme, group and axis in lsjax_config.json's `quantized` (by name: `embed`,
`layers/q`, ...).

The stored layout keeps one stacked `[L, d_in, d_out]` array per projection, in Hugging Face's
terms (`stored_shapes`); `load` turns it into the held layout the model computes with (grouped
products, one dict per layer: `lsjax.model`), one group at a time.

Everything is written into a hidden staging folder beside the target and renamed into place at
the end, so a failed or interrupted conversion leaves nothing at the target path.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from lsjax.config import PROJECTION_GROUPS, ModelConfig
from lsjax.errors import CheckpointError, ConfigError
from lsjax.layers import Layers
from lsjax.model import LAYER_NORMS, Llama, model_from_params, param_shapes
from lsjax.quant import QuantizedWeight, is_quantized, join, path_name
from lsjax.sharding import param_shardings
from lsjax.tokenizer import load_tokenizer

FORMAT, VERSION = "lsjax-model", 1
CONFIG_FILE, HF_CONFIG_FILE, TOKENIZER_DIR, PARAMS_DIR = "lsjax_config.json", "hf_config.json", "tokenizer", "params"

DTYPES = {"float32": jnp.float32, "fp32": jnp.float32, "f32": jnp.float32,
          "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
          "float16": jnp.float16, "fp16": jnp.float16, "f16": jnp.float16}


def as_dtype(dtype: Any) -> Any:
    """Accept a dtype, or a name such as 'bf16'; refuse anything that is not a float type."""
    if isinstance(dtype, str):
        if dtype.lower() not in DTYPES:
            raise ConfigError(f"dtype {dtype!r} is not supported; expected one of {sorted(set(DTYPES))}")
        return DTYPES[dtype.lower()]
    if not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
        raise ConfigError(f"dtype {dtype!r} is not supported; expected a floating dtype")
    return jnp.dtype(dtype).type


def save_model(out: str | Path, config: ModelConfig, params: dict[str, Any], tokenizer_files: dict[str, bytes | str],
               hf_config: dict | None = None, source: dict | None = None) -> Path:
    """Write a model checkpoint at `out`, which must not exist yet; all or nothing."""
    out = Path(out).absolute()
    if out.exists():
        raise CheckpointError(f"{out}: output path already exists; choose another path or remove it first")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        staging.mkdir()
        params, quantized = _stored_parts(params)
        meta = {"format": FORMAT, "version": VERSION, "model": config.to_dict(), "source": source or {}}
        if quantized:
            meta["quantized"] = quantized
        (staging / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
        (staging / HF_CONFIG_FILE).write_text(json.dumps(hf_config or {}, indent=2))
        tok = staging / TOKENIZER_DIR
        tok.mkdir()
        for name, data in tokenizer_files.items():
            (tok / name).write_bytes(data.encode() if isinstance(data, str) else data)
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(staging / PARAMS_DIR, params)
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _stored_parts(params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """`params` with each quantized weight as its parts, and each one's layout by name."""
    layouts = {}

    def plain(path, leaf):
        if is_quantized(leaf):
            layouts[path_name(path)] = leaf.layout()
            return leaf.parts()
        return leaf

    return jax.tree_util.tree_map_with_path(plain, params, is_leaf=is_quantized), layouts


def _read_meta(ckpt: Path) -> dict[str, Any]:
    path = ckpt / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{ckpt}: not an lsjax checkpoint (missing {CONFIG_FILE}); "
                              f"create one with `lsjax convert --hf DIR --out {ckpt}`")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CheckpointError(f"{path}: format {meta.get('format')!r} version {meta.get('version')!r}; "
                              f"expected {FORMAT!r} version {VERSION}")
    return meta


def read_config(ckpt: str | Path) -> ModelConfig:
    return ModelConfig.from_dict(_read_meta(Path(ckpt))["model"])


def stored_shapes(config: ModelConfig) -> dict[str, Any]:
    """Shape of every stored array: one `[L, ...]` stack per projection and norm, plus the globals."""
    L, d = config.num_layers, config.hidden_size
    layers = {name: (L, *shape) for name, shape in config.projection_shapes().items()}
    layers.update({name: (L, d) for name in LAYER_NORMS})
    shapes: dict[str, Any] = {"embed": (config.vocab_size, d), "layers": layers, "norm": (d,)}
    if not config.tie_word_embeddings:
        shapes["lm_head"] = (d, config.vocab_size)
    return shapes


def load_params(ckpt: str | Path, dtype: Any = None, mesh: jax.sharding.Mesh | None = None) -> tuple[ModelConfig, dict]:
    """Restore params in the held layout as jax arrays (cast to `dtype`; sharded over `mesh` by
    `lsjax.sharding` rules)."""
    ckpt = Path(ckpt).absolute()
    meta = _read_meta(ckpt)
    config, layouts = ModelConfig.from_dict(meta["model"]), meta.get("quantized", {})
    if not (ckpt / PARAMS_DIR).is_dir():
        raise CheckpointError(f"{ckpt}: missing {PARAMS_DIR}/ (incomplete checkpoint)")
    shapes = stored_shapes(config)
    with ocp.StandardCheckpointer() as ckptr:
        stored = ckptr.metadata(ckpt / PARAMS_DIR).item_metadata.tree
    dtype = stored["norm"].dtype if dtype is None else as_dtype(dtype)
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, shapes, is_leaf=lambda x: isinstance(x, tuple))
        whole = device
    else:
        shardings = param_shardings(shapes, mesh)
        whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())  # quantized parts: replicated

    def abstract_of(path, shape, sharding):
        name = path_name(path)
        if name not in layouts:
            return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
        parts = _at(stored, name)  # integers as stored, scales and offsets in the float type asked for
        return {k: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype if k == "q" else dtype, sharding=whole)
                for k, m in parts.items()}

    abstract = jax.tree_util.tree_map_with_path(abstract_of, shapes, shardings, is_leaf=lambda x: isinstance(x, tuple))
    try:
        with ocp.StandardCheckpointer() as ckptr:
            params = ckptr.restore(ckpt / PARAMS_DIR, abstract)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{ckpt / PARAMS_DIR}: params do not match {CONFIG_FILE} ({e})") from None
    for name, layout in layouts.items():
        _put(params, name, QuantizedWeight.from_parts(_at(params, name), layout))
    return config, held_params(config, params, mesh)


def _at(tree: dict[str, Any], name: str) -> Any:
    for key in name.split("/"):
        tree = tree[key]
    return tree


def _put(tree: dict[str, Any], name: str, value: Any) -> None:
    *path, last = name.split("/")
    for key in path:
        tree = tree[key]
    tree[last] = value


def held_params(config: ModelConfig, stored: dict[str, Any], mesh: jax.sharding.Mesh | None = None) -> dict[str, Any]:
    """Stored params in the held layout (`lsjax.model.from_projections`), placed by the sharding
    rules; each stored stack is freed once its layers are built, so loading peaks near one copy
    of the weights plus one group."""
    target = None if mesh is None else param_shardings(param_shapes(config), mesh)["layers"]
    layers = dict(stored["layers"])
    held: list[dict[str, Any]] = [{} for _ in range(config.num_layers)]
    for group, members in PROJECTION_GROUPS.items():
        stacks = [layers.pop(m) for m in members]
        for i, layer in enumerate(held):
            mine = [jax.tree.map(lambda x: x[i], s) for s in stacks]  # layer i of each (float or quantized)
            value = join(mine, lambda xs: xs[0] if len(xs) == 1 else jnp.concatenate(xs, axis=-1))
            if target is not None and not is_quantized(value):
                value = jax.device_put(value, target.layer(i)[group])
            layer[group] = value
        for stack in stacks:
            for leaf in jax.tree.leaves(stack):
                leaf.delete()
    for name in LAYER_NORMS:
        for i, layer in enumerate(held):
            layer[name] = layers[name][i]
    return {**stored, "layers": Layers.of_layers(held)}


def load(ckpt: str | Path, dtype: Any = None, mesh: jax.sharding.Mesh | None = None) -> tuple[Llama, Any]:
    """`model, tokenizer = lsjax.load(CKPT, dtype=...)`: the public entry point for a converted model."""

    config, params = load_params(ckpt, dtype, mesh)
    return model_from_params(config, params), load_tokenizer(Path(ckpt) / TOKENIZER_DIR)


def stored_params_numpy(ckpt: str | Path) -> dict[str, Any]:
    """The params exactly as stored (numpy, stored dtype): for bit-exact round-trip checks and export."""
    ckpt = Path(ckpt).absolute()
    with ocp.StandardCheckpointer() as ckptr:
        return jax.tree.map(np.asarray, ckptr.restore(ckpt / PARAMS_DIR))

"""Adapters on disk, alone (no base weights): `adapter_config.json` + `adapter_model.safetensors`.

Key scheme of `adapter_model.safetensors` (stacked on the layer axis, y = x @ W layout):
    layers.{proj}.lora_A          [L, E_p, d_in, r]   proj in q, k, v, o, gate, up, down
    layers.{proj}.lora_B          [L, E_p, r, d_out]  (E_p = 1: plain LoRA, blockwise attention)
    router.weight                 [d_in, E]           switch (input of the first adapted projection)
    layers.{proj}.router.weight   [L, d_in, E]        layerwise
    layers.ffn.router.weight      [L, hidden, E]      blockwise
B is stored unscaled; the forward multiplies by alpha / rank.

The file keeps one tensor per projection (`lsjax.adapters.params.per_projection`); loading groups
them into the layout the forward computes with.

`adapter_config.json`: {"format": "lsjax-adapter", "version": 1, "adapter": AdapterConfig,
"base": fingerprint of the base model's shapes}. Loading refuses another base shape, another
method (when one is expected), and any missing, extra or misshapen tensor, naming it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from lsjax.adapters.config import AdapterConfig
from lsjax.adapters.errors import AdapterError
from lsjax.adapters.params import Adapter, AdapterParams, check_params, grouped, per_projection, per_projection_shapes
from lsjax.adapters.peft import import_peft
from lsjax.config import ModelConfig
from lsjax.errors import ConfigError
from lsjax.jsonfile import read_json_object

FORMAT, VERSION = "lsjax-adapter", 1
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
STRUCTURE = ("method", "num_experts", "top_k", "rank", "targets")  # what fixes the tensors' shapes


def base_fingerprint(model_config: ModelConfig) -> dict[str, Any]:
    """The base-model facts an adapter's shapes depend on."""
    return {"hidden_size": model_config.hidden_size, "intermediate_size": model_config.intermediate_size,
            "num_layers": model_config.num_layers, "num_heads": model_config.num_heads,
            "num_kv_heads": model_config.num_kv_heads, "head_dim": model_config.head_dim,
            "projection_shapes": {p: list(s) for p, s in model_config.projection_shapes().items()}}


def tensor_names(model_config: ModelConfig, adapter_config: AdapterConfig) -> dict[str, tuple[str, ...]]:
    """File key -> path in the per-projection pytree."""
    names = {}
    for p in adapter_config.targets:
        names[f"layers.{p}.lora_A"] = ("experts", p, "a")
        names[f"layers.{p}.lora_B"] = ("experts", p, "b")
    for r in per_projection_shapes(model_config, adapter_config)["routers"]:
        key = "router.weight" if r == "switch" else f"layers.{r}.router.weight"
        names[key] = ("routers", r)
    return names


def save_adapter_arrays(folder: str | Path, model_config: ModelConfig, adapter_config: AdapterConfig,
                        params: AdapterParams) -> Path:
    """Write the adapter (configs + tensors) into `folder` (created if needed)."""
    check_params(model_config, adapter_config, params)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    per = per_projection(model_config, adapter_config, params)
    for key, path in tensor_names(model_config, adapter_config).items():
        tensors[key] = np.ascontiguousarray(np.asarray(_lookup(per, path)))
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": FORMAT})
    meta = {"format": FORMAT, "version": VERSION, "adapter": adapter_config.to_dict(),
            "base": base_fingerprint(model_config)}
    (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    return folder


def save_adapter(folder: str | Path, adapter: Adapter) -> Path:
    return save_adapter_arrays(folder, adapter.model_config, adapter.config, adapter.arrays())


def read_adapter_config(folder: str | Path) -> tuple[AdapterConfig, dict[str, Any]]:
    """The adapter config and the base fingerprint it was saved for."""
    folder = Path(folder)
    path = folder / CONFIG_FILE
    meta = read_json_object(path, AdapterError, "an lsjax adapter folder")
    if "peft_type" in meta:
        raise AdapterError(f"{path}: this is a PEFT adapter; load it with lsjax.adapters.import_peft")
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise AdapterError(f"{path}: format {meta.get('format')!r} version {meta.get('version')!r}; "
                           f"expected {FORMAT!r} version {VERSION}")
    for field in ("adapter", "base"):
        if not isinstance(meta.get(field), dict):
            raise AdapterError(f"{path}: missing field {field!r}")
    try:
        config = AdapterConfig.from_dict(meta["adapter"])
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return config, meta["base"]


def load_adapter_arrays(folder: str | Path, model_config: ModelConfig,
                        expect: AdapterConfig | None = None) -> tuple[AdapterConfig, AdapterParams]:
    """Read an adapter saved for `model_config`'s shapes; `expect` also pins its structure."""
    folder = Path(folder)
    config, base = read_adapter_config(folder)
    _check_base(folder / CONFIG_FILE, base, model_config)
    if expect is not None:
        for field in STRUCTURE:
            if getattr(config, field) != getattr(expect, field):
                raise AdapterError(f"{folder / CONFIG_FILE}: adapter was saved with {field}="
                                   f"{_show(getattr(config, field))}; expected {field}={_show(getattr(expect, field))}")
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        raise AdapterError(f"{folder}: missing {WEIGHTS_FILE}")
    names = tensor_names(model_config, config)
    shapes = per_projection_shapes(model_config, config)
    params: dict[str, Any] = {"experts": {p: {} for p in config.targets}, "routers": {}}
    try:
        with safe_open(str(path), framework="numpy") as f:
            keys = set(f.keys())
            missing, extra = sorted(set(names) - keys), sorted(keys - set(names))
            if missing:
                raise AdapterError(f"{path}: missing tensor {missing[0]!r} (needed by method {config.method!r}, "
                                   f"targets {list(config.targets)})")
            if extra:
                raise AdapterError(f"{path}: unexpected tensor {extra[0]!r} (not used by method {config.method!r}, "
                                   f"targets {list(config.targets)})")
            for key, tree_path in names.items():
                value = f.get_tensor(key)
                want = _lookup(shapes, tree_path)
                if tuple(value.shape) != tuple(want):
                    raise AdapterError(f"{path}: tensor {key!r} has shape {list(value.shape)}; expected {list(want)}")
                _lookup(params, tree_path[:-1])[tree_path[-1]] = value
    except AdapterError:
        raise
    except Exception as e:  # safetensors raises its own types for broken headers
        raise AdapterError(f"{path}: corrupt or unreadable safetensors file ({e})") from None
    return config, grouped(model_config, config, params)


def load_adapter(folder: str | Path, model_config: ModelConfig, expect: AdapterConfig | None = None) -> Adapter:
    config, params = load_adapter_arrays(folder, model_config, expect)
    return Adapter.from_arrays(model_config, config, params)


def _check_base(path: Path, saved: dict[str, Any], model_config: ModelConfig) -> None:
    here = base_fingerprint(model_config)
    for field, value in here.items():
        if saved.get(field) != value:
            raise AdapterError(f"{path}: adapter was saved for a base with {field}={_show(saved.get(field))}; "
                               f"this model has {field}={_show(value)}")


def _lookup(tree: dict, path: tuple[str, ...]):
    for part in path:
        tree = tree[part]
    return tree


def _show(value: Any) -> str:
    return json.dumps(list(value) if isinstance(value, tuple) else value)


def open_adapter(folder: str | Path, model_config: ModelConfig) -> Adapter:
    """An adapter folder in either format: lsjax's own, or PEFT's (plain LoRA) by its `peft_type`."""
    path = Path(folder) / CONFIG_FILE
    if path.is_file() and "peft_type" in path.read_text():
        config, arrays = import_peft(folder, model_config)
        return Adapter.from_arrays(model_config, config, arrays)
    return load_adapter(folder, model_config)

"""Plain LoRA in PEFT's format, both ways: `adapter_config.json` + `adapter_model.safetensors`.

PEFT keys: `base_model.model.model.layers.{i}.{self_attn|mlp}.{q|k|v|o|gate|up|down}_proj.lora_{A|B}.weight`
with lora_A `[r, d_in]` and lora_B `[d_out, r]` (torch's `[out, in]`); lsjax stacks the transposes
into A `[L, 1, d_in, r]` and B `[L, 1, r, d_out]` per projection (grouped on import). Scale: PEFT's alpha / r,
or alpha / sqrt(r) with rsLoRA, which imports as alpha * sqrt(r) so that lsjax's alpha / r is the same number.
PEFT features lsjax does not run (DoRA, biases, per-layer ranks, ...) are refused by field name.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from lsjax.adapters.config import AdapterConfig
from lsjax.adapters.errors import AdapterError
from lsjax.adapters.params import AdapterParams, check_params, grouped, per_projection
from lsjax.config import ModelConfig
from lsjax.jsonfile import read_json_object
from lsjax.model import PROJECTIONS

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
HF_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
              "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
_BY_SHORT = {m.split(".")[-1]: p for p, m in HF_MODULES.items()}  # "q_proj" -> "q"
_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")

# PEFT fields whose non-default values would change the computation: refused on import.
UNSUPPORTED = {"use_dora": (False, None), "lora_bias": (False, None), "bias": ("none", None),
               "fan_in_fan_out": (False, None), "modules_to_save": (None, []), "layers_to_transform": (None, []),
               "layer_replication": (None, []), "rank_pattern": ({}, None), "alpha_pattern": ({}, None),
               "target_parameters": (None, []), "trainable_token_indices": (None, {}),
               "alora_invocation_tokens": (None, []), "use_qalora": (False, None), "use_bdlora": (None, False)}


def peft_key(layer: int, proj: str, which: str) -> str:
    return f"base_model.model.model.layers.{layer}.{HF_MODULES[proj]}.lora_{which}.weight"


def export_peft(folder: str | Path, model_config: ModelConfig, adapter_config: AdapterConfig,
                params: AdapterParams, base_model_name_or_path: str | None = None) -> Path:
    """Write a plain LoRA (method 'lora') as a PEFT adapter that `PeftModel.from_pretrained` loads."""
    if adapter_config.method != "lora":
        raise AdapterError(f"PEFT export holds plain LoRA only; method={adapter_config.method!r} has routed experts "
                           f"(save it with save_adapter)")
    check_params(model_config, adapter_config, params)
    params = per_projection(model_config, adapter_config, params)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for p in adapter_config.targets:
        a, b = np.asarray(params["experts"][p]["a"]), np.asarray(params["experts"][p]["b"])
        for i in range(model_config.num_layers):
            tensors[peft_key(i, p, "A")] = np.ascontiguousarray(a[i, 0].T)
            tensors[peft_key(i, p, "B")] = np.ascontiguousarray(b[i, 0].T)
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
              "r": adapter_config.rank, "lora_alpha": adapter_config.alpha, "lora_dropout": adapter_config.dropout,
              "target_modules": [HF_MODULES[p].split(".")[-1] for p in adapter_config.targets],
              "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
              "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {},
              "init_lora_weights": True, "inference_mode": True}
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return folder


def import_peft(folder: str | Path, model_config: ModelConfig) -> tuple[AdapterConfig, AdapterParams]:
    """Read a PEFT LoRA adapter made for a Llama-family model of `model_config`'s shapes."""
    folder = Path(folder)
    cfg_path, path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    for f in (cfg_path, path):
        if not f.is_file():
            raise AdapterError(f"{folder}: missing {f.name} (expected a PEFT LoRA adapter folder)")
    raw = read_json_object(cfg_path, AdapterError, "a PEFT LoRA adapter folder")
    if raw.get("peft_type") != "LORA":
        raise AdapterError(f"{cfg_path}: peft_type={raw.get('peft_type')!r}; expected 'LORA'")
    for field, ok in UNSUPPORTED.items():
        if field in raw and raw[field] not in ok:
            raise AdapterError(f"{cfg_path}: {field}={raw[field]!r} is not supported; expected {ok[0]!r}")
    for field in ("r", "lora_alpha"):
        if field not in raw:
            raise AdapterError(f"{cfg_path}: missing field {field!r}")
    rank, alpha = raw["r"], raw["lora_alpha"]
    if raw.get("use_rslora"):
        alpha = alpha * math.sqrt(rank)

    tensors = _read_tensors(path)
    targets = _targets(cfg_path, raw.get("target_modules"), tensors)
    config = AdapterConfig(method="lora", rank=rank, alpha=float(alpha), dropout=float(raw.get("lora_dropout") or 0.0),
                           targets=targets)
    expected = {peft_key(i, p, w) for p in targets for i in range(model_config.num_layers) for w in "AB"}
    missing, extra = sorted(expected - set(tensors), key=_natural), sorted(set(tensors) - expected, key=_natural)
    if missing:
        raise AdapterError(f"{path}: missing tensor {missing[0]!r} (target_modules {list(_hf(targets))}, "
                           f"num_hidden_layers={model_config.num_layers})")
    if extra:
        raise AdapterError(f"{path}: unexpected tensor {extra[0]!r} (target_modules {list(_hf(targets))}, "
                           f"num_hidden_layers={model_config.num_layers})")
    shapes = model_config.projection_shapes()
    experts = {}
    for p in targets:
        d_in, d_out = shapes[p]
        a, b = [], []
        for i in range(model_config.num_layers):
            a.append(_checked(path, peft_key(i, p, "A"), tensors, (rank, d_in)).T)
            b.append(_checked(path, peft_key(i, p, "B"), tensors, (d_out, rank)).T)
        experts[p] = {"a": np.stack(a)[:, None].astype(np.float32), "b": np.stack(b)[:, None].astype(np.float32)}
    params = grouped(model_config, config, {"experts": experts, "routers": {}})
    check_params(model_config, config, params)
    return config, params


def _read_tensors(path: Path) -> dict[str, np.ndarray]:
    try:
        with safe_open(str(path), framework="numpy") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise AdapterError(f"{path}: corrupt or unreadable safetensors file ({e})") from None


def _targets(cfg_path: Path, target_modules: Any, tensors: dict[str, np.ndarray]) -> tuple[str, ...]:
    """lsjax projection names from PEFT's target_modules (names, 'all-linear', or a regex: then the keys)."""
    if target_modules == "all-linear":
        return PROJECTIONS
    if isinstance(target_modules, (list, tuple)):
        found = []
        for name in target_modules:
            short = str(name).split(".")[-1]
            if short not in _BY_SHORT:
                raise AdapterError(f"{cfg_path}: target_modules entry {name!r} is not supported; expected names "
                                   f"from {sorted(_BY_SHORT)}")
            found.append(_BY_SHORT[short])
        return tuple(p for p in PROJECTIONS if p in found)
    found = set()
    for key in tensors:
        m = _KEY.match(key)
        if m is None:
            raise AdapterError(f"{cfg_path.parent / WEIGHTS_FILE}: unexpected tensor {key!r} (not a Llama LoRA key)")
        if m.group(3) not in _BY_SHORT:
            raise AdapterError(f"{cfg_path.parent / WEIGHTS_FILE}: tensor {key!r} adapts {m.group(3)!r}, which lsjax "
                               f"does not support; expected one of {sorted(_BY_SHORT)}")
        found.add(_BY_SHORT[m.group(3)])
    if not found:
        raise AdapterError(f"{cfg_path}: no LoRA tensors and no usable target_modules={target_modules!r}")
    return tuple(p for p in PROJECTIONS if p in found)


def _checked(path: Path, key: str, tensors: dict[str, np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    value = tensors[key]
    if tuple(value.shape) != shape:
        raise AdapterError(f"{path}: tensor {key!r} has shape {list(value.shape)}; expected {list(shape)}")
    return value.astype(np.float32)


def _hf(targets: tuple[str, ...]):
    return (HF_MODULES[p].split(".")[-1] for p in targets)


def _natural(key: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]

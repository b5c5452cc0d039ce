"""`TrainConfig`: a typed, validated training run description, loaded from YAML with overrides.

    config = load_config("lsjax/train/configs/smollm2_switch.yaml", ["steps=20", "optim.lr=3e-4"])

Every field is checked in `__post_init__` (a bad value fails before anything is loaded, naming the
field). Overrides are `key=value` with dotted keys for nested sections; values are parsed as YAML
(`steps=20` is an int, `data.tasks=[arc_easy,piqa]` a list). The resolved config is written with
the run (`config.yaml`) and into every checkpoint; `fingerprint()` is what a resume must match.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import yaml

from lsjax.adapters.config import AdapterConfig
from lsjax.data import TASKS
from lsjax.errors import ConfigError
from lsjax.validate import check, from_fields, is_int, is_number

DTYPES = ("float32", "bfloat16")


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-3` as a float (YAML 1.1 wants `1.0e-3`)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)








@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Training data: multiple-choice tasks (lsjax.data) and local JSONL files (lsjax.datafiles: text,
    prompt/completion or chat messages), their hash split, the row length and packing."""

    tasks: tuple[str, ...] = ("arc_easy",)
    files: tuple[str, ...] = ()  # JSONL (or .jsonl.gz) files; each line's fields give its format
    heldout_fraction: float = 0.3
    max_length: int = 128
    packing: bool = True  # short examples share a row (separate segments); off: one example per row
    eval_docs: int = 64  # held-out documents (per task) scored for the held-out loss
    eval_accuracy_docs: int = 0  # held-out documents (per task) for accuracy via lsjax.eval.harness; 0 = off

    def __post_init__(self):

        tasks = (self.tasks,) if isinstance(self.tasks, str) else tuple(self.tasks or ())
        files = (self.files,) if isinstance(self.files, str) else tuple(self.files or ())
        object.__setattr__(self, "tasks", tasks)
        object.__setattr__(self, "files", files)
        check(len(tasks) + len(files) > 0, "data.tasks", list(tasks),
               "a non-empty list of task names (or data.files)")
        for f in files:
            check(isinstance(f, str) and f != "", "data.files", f, "paths of JSONL files")
        check(isinstance(self.packing, bool), "data.packing", self.packing, "true or false")
        for t in tasks:
            check(t in TASKS, "data.tasks", t, f"one of {sorted(TASKS)}")
        check(is_number(self.heldout_fraction) and 0 < self.heldout_fraction < 1, "data.heldout_fraction",
               self.heldout_fraction, "a number in (0, 1)")
        check(is_int(self.max_length, 2), "data.max_length", self.max_length, "an integer >= 2")
        check(is_int(self.eval_docs, 0), "data.eval_docs", self.eval_docs, "an integer >= 0")
        check(is_int(self.eval_accuracy_docs, 0), "data.eval_accuracy_docs", self.eval_accuracy_docs,
               "an integer >= 0")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup then cosine decay to `end_lr_fraction * lr`, global-norm clipping."""

    lr: float = 1e-3
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_norm: float = 1.0  # 0 = no clipping
    warmup_steps: int = 10
    end_lr_fraction: float = 0.1
    accumulation: int = 1  # microbatches per optimizer step (the batch is split, one update per step)

    def __post_init__(self):
        check(is_number(self.lr) and self.lr > 0, "optim.lr", self.lr, "a positive number")
        check(is_number(self.weight_decay) and self.weight_decay >= 0, "optim.weight_decay", self.weight_decay,
               "a number >= 0")
        for name in ("b1", "b2"):
            v = getattr(self, name)
            check(is_number(v) and 0 <= v < 1, f"optim.{name}", v, "a number in [0, 1)")
        check(is_number(self.eps) and self.eps > 0, "optim.eps", self.eps, "a positive number")
        check(is_number(self.clip_norm) and self.clip_norm >= 0, "optim.clip_norm", self.clip_norm, "a number >= 0")
        check(is_int(self.warmup_steps, 0), "optim.warmup_steps", self.warmup_steps, "an integer >= 0")
        check(is_number(self.end_lr_fraction) and 0 <= self.end_lr_fraction <= 1, "optim.end_lr_fraction",
               self.end_lr_fraction, "a number in [0, 1]")
        check(is_int(self.accumulation, 1), "optim.accumulation", self.accumulation, "an integer >= 1")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh (data, fsdp, tensor); the product must not exceed the devices available."""

    data: int = 1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self):
        for name in ("data", "fsdp", "tensor"):
            check(is_int(getattr(self, name), 1), f"mesh.{name}", getattr(self, name), "a positive integer")

    @property
    def size(self) -> int:
        return self.data * self.fsdp * self.tensor

    @property
    def batch_shards(self) -> int:
        return self.data * self.fsdp


SECTIONS = {"data": DataConfig, "optim": OptimConfig, "mesh": MeshConfig}
# fields that may change between a run and its resume (they do not change the trained numbers)
RESUMABLE = ("run_dir", "mesh", "eval_every", "checkpoint_every", "keep_checkpoints", "log_every", "progress",
             "tensorboard")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: str = ""  # lsjax checkpoint folder (from `lsjax convert`)
    adapter: AdapterConfig = dataclasses.field(default_factory=AdapterConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    batch_size: int = 8  # global batch (all processes, all microbatches)
    steps: int = 100
    eval_every: int = 0  # 0 = only at the end
    checkpoint_every: int = 50
    keep_checkpoints: int = 3
    log_every: int = 1
    seed: int = 0
    dtype: str = "float32"  # compute and base-params dtype; adapter params and optimizer state stay fp32
    run_dir: str = "runs/train"
    progress: bool = True
    tensorboard: bool = False  # also write TensorBoard event files to run_dir/tb (needs tensorboardX)

    def __post_init__(self):
        if isinstance(self.adapter, dict):
            object.__setattr__(self, "adapter", AdapterConfig.from_dict(self.adapter))
        check(isinstance(self.adapter, AdapterConfig), "adapter", self.adapter, "an AdapterConfig mapping")
        for name, cls in SECTIONS.items():
            value = getattr(self, name)
            if isinstance(value, dict):
                object.__setattr__(self, name, from_fields(cls, value, name))
            check(isinstance(getattr(self, name), cls), name, value, f"a {name} mapping")
        check(isinstance(self.model, str) and self.model != "", "model", self.model,
               "the path of an lsjax checkpoint folder")
        check(is_int(self.batch_size, 1), "batch_size", self.batch_size, "a positive integer")
        check(is_int(self.steps, 1), "steps", self.steps, "a positive integer")
        for name in ("eval_every", "checkpoint_every", "seed"):
            check(is_int(getattr(self, name), 0), name, getattr(self, name), "an integer >= 0")
        for name in ("keep_checkpoints", "log_every"):
            check(is_int(getattr(self, name), 1), name, getattr(self, name), "a positive integer")
        for name in ("progress", "tensorboard"):
            check(isinstance(getattr(self, name), bool), name, getattr(self, name), "true or false")
        check(self.dtype in DTYPES, "dtype", self.dtype, f"one of {DTYPES}")
        check(isinstance(self.run_dir, str) and self.run_dir != "", "run_dir", self.run_dir, "a folder path")
        shards = self.mesh.batch_shards * self.optim.accumulation
        if self.batch_size % shards:
            raise ConfigError(f"batch_size={self.batch_size} is not divisible by mesh.data * mesh.fsdp * "
                              f"optim.accumulation = {self.mesh.data} * {self.mesh.fsdp} * "
                              f"{self.optim.accumulation} = {shards}")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["adapter"] = self.adapter.to_dict()
        out["data"]["tasks"] = list(self.data.tasks)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        return from_fields(cls, data, "train")

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def fingerprint(self) -> str:
        """A hash of everything that determines the trained numbers (not paths, mesh or intervals)."""
        ident = {k: v for k, v in self.to_dict().items() if k not in RESUMABLE}
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]

    def differences(self, other: dict[str, Any]) -> list[str]:
        """Dotted keys whose values differ from another config's dict (resumable fields ignored)."""
        mine = _flatten({k: v for k, v in self.to_dict().items() if k not in RESUMABLE})
        theirs = _flatten({k: v for k, v in other.items() if k not in RESUMABLE})
        return sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))




def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`["steps=20", "optim.lr=1e-4", "adapter.router.jitter=0.01"]` applied to a nested dict."""
    data = json.loads(json.dumps(data))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (dotted keys for sections)")
        key, raw = item.split("=", 1)
        try:
            value = _yaml_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({e})") from None
        node, parts = data, key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """A YAML file (or nothing: the defaults) plus `key=value` overrides -> a validated TrainConfig."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: training config file not found")
        try:
            data = _yaml_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a training config must be a YAML mapping")
    data = apply_overrides(data, list(overrides))
    return TrainConfig.from_dict(data)


def save_config(config: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))

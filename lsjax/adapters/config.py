"""`AdapterConfig`: the typed, validated description of an adapter (plain LoRA or routed experts).

Validated eagerly in `__post_init__`, so a bad value fails where it is written, naming the field,
the value and what was expected. Serialised as JSON through `to_dict` / `from_dict`.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

from lsjax.errors import ConfigError
from lsjax.model import PROJECTIONS
from lsjax.validate import check, from_fields, is_int, is_number

class Method(enum.StrEnum):
    """The adapter methods (equal to their names as strings)."""

    LORA = "lora"  # one adapter, no router
    SWITCH = "switch"  # LoRA-Switch: one router for the whole model, decided once per token
    LAYERWISE = "layerwise"  # MoLA: a router in every adapted projection
    BLOCKWISE = "blockwise"  # MoRAL / MixLoRA: a router per FFN block, plain LoRA on attention

    def __repr__(self) -> str:  # messages name the value, as a user writes it
        return repr(self.value)


METHODS = tuple(m.value for m in Method)  # the names, for messages and CLI choices
INITS = ("kaiming", "gaussian")
ATTENTION = ("q", "k", "v", "o")
FFN = ("gate", "up", "down")
ALL_LINEAR = "all-linear"

DEFAULT_EXPERTS, DEFAULT_TOP_K = 8, 2  # the paper's main setting (8 experts, top-2)


@dataclasses.dataclass(frozen=True)
class RouterConfig:
    """Router numerics: softmax over E in fp32 -> top-k -> renormalise, plus training regularisers.

    jitter: multiplicative noise on the router input while training, x * U(1 - jitter, 1 + jitter)
    (Switch Transformer). z_loss_coef / aux_loss_coef weight the router z-loss and the load-balance
    loss in `AdapterAux.loss`. init_std: normal init of router weights (MixLoRA uses 0.02).
    """

    jitter: float = 0.0
    z_loss_coef: float = 0.0
    aux_loss_coef: float = 0.01
    init_std: float = 0.02

    def __post_init__(self):
        for name in ("jitter", "z_loss_coef", "aux_loss_coef"):
            value = getattr(self, name)
            check(is_number(value) and value >= 0, f"router.{name}", value, "a number >= 0")
        check(self.jitter < 1, "router.jitter", self.jitter, "a number in [0, 1)")
        check(is_number(self.init_std) and self.init_std > 0, "router.init_std", self.init_std,
               "a positive number")


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """What adapter to attach to a Llama-family model.

    method: `lora` (one adapter), `switch` (LoRA-Switch: one router at the first adapted projection
    of layer 0, its choice reused everywhere), `layerwise` (MoLA: a router in every adapted
    projection), `blockwise` (MoRAL/MixLoRA: a router per FFN block over experts on gate/up/down,
    plain LoRA on attention targets).
    num_experts / top_k: default 8 / 2 for routed methods and 1 / 1 for `lora`.
    targets: projection names from q, k, v, o, gate, up, down, or "all-linear".
    Expert update: delta = (alpha / rank) * A @ B, A initialised by `init`, B zero.
    What the adapter is, never how a forward computes it (`lsjax.adapters.routing.TermForm`).
    """

    method: Method = Method.SWITCH
    num_experts: int | None = None
    top_k: int | None = None
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] | str = ALL_LINEAR
    router: RouterConfig = dataclasses.field(default_factory=RouterConfig)
    init: str = "kaiming"

    def __post_init__(self):
        check(self.method in METHODS, "method", self.method, f"one of {METHODS}")
        object.__setattr__(self, "method", Method(self.method))
        routed = self.method != "lora"
        if self.num_experts is None:
            object.__setattr__(self, "num_experts", DEFAULT_EXPERTS if routed else 1)
        if self.top_k is None:
            object.__setattr__(self, "top_k", min(DEFAULT_TOP_K, self.num_experts) if routed else 1)
        check(is_int(self.num_experts) and self.num_experts >= 1, "num_experts", self.num_experts,
               "a positive integer")
        if not routed:
            check(self.num_experts == 1, "num_experts", self.num_experts, "1 for method 'lora'")
        check(is_int(self.top_k) and 1 <= self.top_k <= self.num_experts, "top_k", self.top_k,
               f"an integer in [1, num_experts={self.num_experts}]")
        check(is_int(self.rank) and self.rank >= 1, "rank", self.rank, "a positive integer")
        check(is_number(self.alpha) and self.alpha > 0, "alpha", self.alpha, "a positive number")
        check(is_number(self.dropout) and 0 <= self.dropout < 1, "dropout", self.dropout, "a number in [0, 1)")
        object.__setattr__(self, "targets", normalise_targets(self.targets))
        if self.method == "blockwise":
            check(any(t in FFN for t in self.targets), "targets", list(self.targets),
                   f"at least one FFN projection {FFN} for method 'blockwise'")
        if isinstance(self.router, dict):
            object.__setattr__(self, "router", from_fields(RouterConfig, self.router, "router"))
        check(isinstance(self.router, RouterConfig), "router", self.router, "a RouterConfig")
        check(self.init in INITS, "init", self.init, f"one of {INITS}")

    @property
    def scale(self) -> float:
        """alpha / rank, applied to every expert's A @ B in the forward (PEFT stores B unscaled)."""
        return self.alpha / self.rank

    def experts_for(self, proj: str) -> int:
        """Experts stacked for one projection: 1 for plain LoRA and blockwise attention targets."""
        if self.method == "lora" or (self.method == "blockwise" and proj not in FFN):
            return 1
        return self.num_experts

    def replace(self, **changes) -> "AdapterConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["method"], out["targets"] = self.method.value, list(self.targets)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AdapterConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"adapter config must be a JSON object; got {type(data).__name__}")
        # "computation" (how a forward ran, which some adapter files record) is no part of the adapter
        return from_fields(cls, {k: v for k, v in data.items() if k != "computation"}, "adapter")


def normalise_targets(targets: Any) -> tuple[str, ...]:
    """"all-linear", a name or a list of names -> the targets as a tuple in execution order."""
    if targets == ALL_LINEAR:
        return PROJECTIONS
    if isinstance(targets, str):
        targets = (targets,)
    check(isinstance(targets, (list, tuple)) and len(targets) > 0, "targets", targets,
           f"a non-empty list of {PROJECTIONS} or {ALL_LINEAR!r}")
    for t in targets:
        check(t in PROJECTIONS, "targets", t, f"one of {PROJECTIONS} or {ALL_LINEAR!r}")
    return tuple(p for p in PROJECTIONS if p in targets)






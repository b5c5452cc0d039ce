"""Routed LoRA experts (LoRA-Switch, MoLA, MoRAL/MixLoRA) and plain LoRA on the lsjax Llama.

    config = AdapterConfig(method="switch", num_experts=8, top_k=2, rank=16, targets="all-linear")
    model = AdaptedLlama.create(base, config, rngs=nnx.Rngs(0))     # base: lsjax.Llama, frozen
    logits, aux = model(ids, mask, rng=key, train=True)             # aux.loss: router regularisers
    grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, TRAINABLE))(model)

Pure core: `adapted_forward(model_config, base_params, config, adapter.arrays(), ids, mask)`.
Modules: config (AdapterConfig), params (Variable types, shapes, Adapter), routing (routers and
the routed LoRA term), methods (forward, cached forward, hooks), files (lsjax adapter files),
peft (PEFT import/export), merge (merged HF export).
"""

from lsjax.adapters.config import AdapterConfig, RouterConfig
from lsjax.adapters.errors import AdapterError
from lsjax.adapters.files import load_adapter, load_adapter_arrays, open_adapter, save_adapter, save_adapter_arrays
from lsjax.adapters.merge import export_merged_hf, merge_lora
from lsjax.adapters.methods import (
                                    AdaptedLlama,
                                    AdapterAux,
                                    AdaptedProducts,
                                    adapted_forward,
                                    adapted_forward_cached,
                                    project_hooks,
    switch_route,
)
from lsjax.adapters.params import (
                                    TRAINABLE,
                                    Adapter,
                                    AdapterParam,
                                    RouterParam,
                                    check_params,
                                    grouped,
                                    init_params,
                                    adapter_shapes,
                                    per_projection,
)
from lsjax.adapters.peft import export_peft, import_peft
from lsjax.adapters.routing import RouterStats, Routing, group_term, router_logits, router_stats, top_k_route

__all__ = [
    "AdapterConfig", "RouterConfig", "AdapterError",
    "Adapter", "AdapterParam", "RouterParam", "TRAINABLE", "init_params", "adapter_shapes", "check_params",
    "per_projection", "grouped",
    "AdaptedLlama", "AdapterAux", "AdaptedProducts", "adapted_forward", "adapted_forward_cached", "project_hooks",
    "switch_route",
    "Routing", "RouterStats", "router_logits", "top_k_route", "router_stats", "group_term",
    "save_adapter", "load_adapter", "open_adapter", "save_adapter_arrays", "load_adapter_arrays",
    "export_peft", "import_peft", "merge_lora", "export_merged_hf",
]

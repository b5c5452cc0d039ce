"""Pallas kernels (Triton backend on GPU, interpret mode elsewhere) with pure-jnp references.

Depends on jax and numpy only. Every public kernel takes `implementation=` ("pallas", "xla",
or None = pallas on GPU, xla elsewhere) and `interpret=` (default: True off GPU).
"""

from .reference import (
    lora_delta_reference,
    routed_lora_matmul_reference,
    sgmm_merge_reference,
    sgmm_switch_reference,
)
from .routed_matmul import routed_lora_add, routed_lora_matmul
from .sgmm import sgmm_merge, sgmm_switch

__all__ = [
    "sgmm_merge",
    "sgmm_switch",
    "routed_lora_matmul",
    "routed_lora_add",
    "sgmm_merge_reference",
    "sgmm_switch_reference",
    "routed_lora_matmul_reference",
    "lora_delta_reference",
]

"""Pallas kernels (Triton backend on GPU, interpret mode elsewhere) with pure-jnp references.

Depends on jax and numpy only. Every public kernel takes `implementation=` ("pallas", "xla",
or None = pallas on GPU, xla elsewhere) and `interpret=` (default: True off GPU).
"""

from .quantized import quantized_matmul
from .reference import (
    lora_delta_reference,
    quantized_matmul_reference,
    routed_group_matmul_reference,
    sgmm_merge_reference,
    sgmm_switch_reference,
    whole_output,
)
from .routed_group import routed_group_matmul
from .sgmm import sgmm_merge, sgmm_switch

__all__ = [
    "quantized_matmul",
    "quantized_matmul_reference",
    "routed_group_matmul",
    "sgmm_merge",
    "sgmm_switch",
    "routed_group_matmul_reference",
    "sgmm_merge_reference",
    "sgmm_switch_reference",
    "lora_delta_reference",
    "whole_output",
]

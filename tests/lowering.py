"""Lowering for a GPU on a machine without one: the abstract target and the custom calls in a program.

`jax.jit(f).trace(*avals).lower(lowering_platforms=("cuda",))` runs JAX's CUDA lowering rules
(Pallas' Triton lowering among them) on a CPU, from abstract shapes: nothing is allocated or run.
"""

import contextlib

import jax

try:  # named by Pallas from jax 0.11 on
    from jax.experimental.pallas.triton import CUSTOM_CALL_TARGET_NAME as TRITON_TARGET
except ImportError:
    TRITON_TARGET = "__gpu$xla.gpu.triton"


def gpu_target():
    """A context naming an H100 as the target: jax 0.11 reads the target GPU from the abstract mesh
    when no GPU is attached (0.10 assumed one). Axis types are given, since their default changes."""
    if not hasattr(jax.sharding, "AbstractDevice") or jax.default_backend() == "gpu":
        return contextlib.nullcontext()
    h100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=None, platform="cuda")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), (jax.sharding.AxisType.Auto,), abstract_device=h100)
    return jax.sharding.use_abstract_mesh(mesh)


def lower_for_gpu(fn, *avals, **jit_options):
    """`fn` jitted, traced on `avals` and lowered for CUDA under `gpu_target()`."""
    with gpu_target():
        return jax.jit(fn, **jit_options).trace(*avals).lower(lowering_platforms=("cuda",))


def custom_calls(lowered) -> list:
    """Every `stablehlo.custom_call` op of a lowered program, nested regions included."""
    calls = []

    def walk(op):
        if op.name == "stablehlo.custom_call":
            calls.append(op)
        for region in op.regions:
            for block in region:
                for child in block:
                    walk(child.operation)

    walk(lowered.compiler_ir("stablehlo").operation)
    return calls


def call_target(op) -> str:
    return str(op.attributes["call_target_name"]).strip('"')

"""The jitted decode step lowers for a GPU at llama2-7b shape, from abstract shapes (nothing is
allocated): the base and switch `unmerged` on XLA, switch `fused` and `merged` on the Pallas backend.
What each program holds is checked: one routed group kernel per layer and adapted group for `fused`,
one SGMM merge per adapted group (all layers at once) for `merged`, no Pallas call on XLA, and no
host callback anywhere (a decode step that calls back to Python stalls the GPU every token)."""

import collections
import re

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from lowering import TRITON_TARGET, call_target, custom_calls, lower_for_gpu

from lsjax import strategies
from lsjax.adapters import Adapter, AdapterConfig
from lsjax.adapters.params import adapted_groups
from lsjax.backends import XLA, PallasBackend
from lsjax.config import named_config
from lsjax.decode import init_cache
from lsjax.model import Llama

CONFIG = named_config("llama2-7b")
SWITCH = AdapterConfig(method="switch", num_experts=8, top_k=2, rank=16, targets="all-linear")
PALLAS = PallasBackend(interpret=False)  # the GPU's kernels, whatever platform runs the test
BF16 = jnp.bfloat16


@pytest.fixture(scope="module")
def abstract_arrays():
    params = jax.eval_shape(lambda: Llama(CONFIG, rngs=nnx.Rngs(0), dtype=BF16).params())
    adapter = jax.eval_shape(lambda: Adapter(CONFIG, SWITCH, rngs=nnx.Rngs(0), dtype=BF16).arrays())
    return params, adapter


def lowered_step(abstract_arrays, strategy: str, backend, batch: int = 1):
    """The decode step of `strategy` on `backend`, lowered for CUDA; its custom calls' targets counted."""
    params, adapter = abstract_arrays
    adapter_config = None if strategy == "base" else SWITCH
    bundle = jax.eval_shape(lambda p, a: strategies.prepare_bundle(CONFIG, p, adapter_config, a, strategy),
                            params, adapter)
    cache = jax.eval_shape(lambda: init_cache(CONFIG, batch, 128, BF16, stacked=strategy == "merged"))
    _, step = strategies.build(CONFIG, adapter_config, strategy, backend)
    lowered = lower_for_gpu(step, bundle, jax.ShapeDtypeStruct((batch,), jnp.int32), cache, donate_argnums=(2,))
    return lowered, collections.Counter(call_target(op) for op in custom_calls(lowered))


def assert_no_host_callback(lowered, targets):
    callbacks = [t for t in targets if "callback" in t.lower()]
    assert not callbacks, f"host callbacks in the decode step: {callbacks}"
    assert "callback" not in lowered.as_text().lower()


@pytest.mark.parametrize("strategy, batch", [("base", 1), ("unmerged", 1), ("unmerged", 8)])
def test_xla_decode_steps_lower_without_pallas_or_callbacks(abstract_arrays, strategy, batch):
    lowered, targets = lowered_step(abstract_arrays, strategy, XLA, batch)
    assert TRITON_TARGET not in targets, targets
    assert_no_host_callback(lowered, targets)
    assert "stablehlo.dot_general" in lowered.as_text()  # the products really are in the program


def test_fused_step_on_pallas_is_one_triton_kernel_per_layer_and_group(abstract_arrays):
    lowered, targets = lowered_step(abstract_arrays, "fused", PALLAS)
    groups = adapted_groups(SWITCH)
    assert len(groups) == 4  # q|k|v, o, gate|up, down
    assert targets[TRITON_TARGET] == CONFIG.num_layers * len(groups)
    assert_no_host_callback(lowered, targets)


def test_merged_step_on_pallas_is_one_sgmm_kernel_per_group(abstract_arrays):
    lowered, targets = lowered_step(abstract_arrays, "merged", PALLAS)
    assert targets[TRITON_TARGET] == len(adapted_groups(SWITCH))  # every layer of a group merged in one call
    assert_no_host_callback(lowered, targets)


def materialised_weights(hlo: str, shape: tuple[int, int]) -> list[str]:
    """Instructions of a compiled program's entry computation that produce a float array of `shape`."""
    dims = ",".join(map(str, shape))
    entry = hlo[hlo.index("\nENTRY"):]
    return [line.strip() for line in entry.splitlines() if re.search(rf"= (bf16|f16|f32)\[{dims}\]", line)]


@pytest.mark.parametrize("spec", ["int8", "int4:32"])
def test_a_quantized_product_reads_its_integers_on_xla_gpu(spec):
    """XLA:GPU fuses the dequantize into the product (llama2-7b's up projection, bf16, batch 8): no
    float copy of the weight appears in the compiled program, so a step reads the integers alone.
    Checked where the program is compiled: on a GPU (XLA:CPU materialises the floats, which is why
    the native CPU backend dequantizes in registers; the check is run on it once, inverted)."""
    from lsjax import quant

    k, n = CONFIG.hidden_size, CONFIG.intermediate_size
    scheme, group = quant.parse_spec(spec)
    w = quant.quantize(jax.random.normal(jax.random.key(0), (k, n), BF16), scheme, group)
    hlo = jax.jit(quant.product).lower(jnp.ones((8, k), BF16), w).compile().as_text()
    found = materialised_weights(hlo, (k, n))
    if jax.default_backend() == "gpu":
        assert not found, f"the dequantized weight is materialised: {found[0][:200]}"
    else:
        assert found, "XLA:CPU's program holds no float copy of the weight: the check would not see one"


@pytest.mark.parametrize("spec", ["int8", "int4:32"])
def test_a_quantized_base_step_on_pallas_is_one_kernel_per_layer_and_group(spec):
    """Over a quantized base (llama2-7b, bf16 scales), the Pallas backend's decode step runs each
    layer's four products as the W8A16 / W4A16 kernel: 4 x 32 Triton kernels, no host callback."""
    from lsjax import quant

    scheme, group = quant.parse_spec(spec)
    params = jax.eval_shape(lambda: quant.quantize_params(Llama(CONFIG, rngs=nnx.Rngs(0), dtype=BF16).params(),
                                                          scheme, group))
    lowered, targets = lowered_step((params, None), "base", PALLAS)
    assert targets[TRITON_TARGET] == CONFIG.num_layers * 4
    assert_no_host_callback(lowered, targets)

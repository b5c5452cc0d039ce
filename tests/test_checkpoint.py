"""orbax round trip is bit-exact; dtype casting and sharded loading."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import make_hf_model, ragged_batch

import lsjax
from lsjax.checkpoint import load_params, stored_params_numpy
from lsjax.convert import convert_hf
from lsjax.convert.assemble import assemble, source_dtype
from lsjax.convert.hf import lazy_tensors, read_hf_config, safetensors_files
from lsjax.model import to_projections


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    make_hf_model(root / "hf", tie_word_embeddings=False)
    convert_hf(root / "hf", root / "ckpt", progress=False)
    return root


def test_round_trip_bit_exact(converted):
    config, _ = read_hf_config(converted / "hf")
    tensors = lazy_tensors(safetensors_files(converted / "hf"))
    original = assemble(config, tensors, source_dtype(tensors), progress=False)
    stored = stored_params_numpy(converted / "ckpt")
    _, loaded = load_params(converted / "ckpt")
    back = to_projections(config, jax.tree.map(np.asarray, loaded))
    for want, got, again in zip(jax.tree.leaves(original), jax.tree.leaves(stored), jax.tree.leaves(back)):
        assert got.dtype == want.dtype == again.dtype == np.float32
        assert np.array_equal(got, want) and np.array_equal(again, want)


def test_loads_grouped_products_one_array_per_layer(converted):
    """The held layout: q|k|v and gate|up side by side, each layer its own buffers."""
    config, _ = read_hf_config(converted / "hf")
    tensors = {t.name: t.load() for t in lazy_tensors(safetensors_files(converted / "hf"))}
    _, loaded = load_params(converted / "ckpt")
    assert not loaded["layers"].stacked and loaded["layers"].count == config.num_layers
    for i, layer in enumerate(loaded["layers"].tree):
        hf = lambda name: tensors[f"model.layers.{i}.{name}.weight"].T  # noqa: E731  torch's [out, in]
        np.testing.assert_array_equal(layer["qkv"], np.concatenate([hf("self_attn.q_proj"), hf("self_attn.k_proj"),
                                                                    hf("self_attn.v_proj")], axis=1))
        np.testing.assert_array_equal(layer["gate_up"], np.concatenate([hf("mlp.gate_proj"),
                                                                        hf("mlp.up_proj")], axis=1))
        np.testing.assert_array_equal(layer["down"], hf("mlp.down_proj"))
    pointers = {layer[name].unsafe_buffer_pointer() for layer in loaded["layers"].tree for name in layer}
    assert len(pointers) == 6 * config.num_layers  # no layer shares (or slices) another's buffer


def test_bf16_load(converted):
    model32, tok = lsjax.load(converted / "ckpt")
    model16, _ = lsjax.load(converted / "ckpt", dtype="bf16")
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(model16.params()))
    ids, mask, _ = ragged_batch([11, 6])
    a = np.asarray(model32(ids, mask))
    b = np.asarray(model16(ids, mask))
    assert b.dtype == np.float32 and np.isfinite(b).all()
    valid = mask.astype(bool)
    assert np.abs(a - b)[valid].max() <= 0.05 * np.abs(a)[valid].max()
    # the tokenizer came along with the checkpoint
    assert tok.decode(tok.encode("hello world")) == "hello world"

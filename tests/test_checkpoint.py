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
    for want, got, back in zip(jax.tree.leaves(original), jax.tree.leaves(stored), jax.tree.leaves(loaded)):
        assert got.dtype == want.dtype == np.float32
        assert np.array_equal(got, want) and np.array_equal(np.asarray(back), want)


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


def test_sharded_load_matches(converted):
    devices = np.array(jax.devices()[:1]).reshape(1, 1, 1)
    mesh = jax.sharding.Mesh(devices, ("data", "fsdp", "tensor"))
    model, _ = lsjax.load(converted / "ckpt", mesh=mesh)
    ref, _ = lsjax.load(converted / "ckpt")
    ids, mask, _ = ragged_batch([7, 4])
    assert np.array_equal(np.asarray(model(ids, mask)), np.asarray(ref(ids, mask)))
    assert isinstance(model.layers.q[...].sharding, jax.sharding.NamedSharding)

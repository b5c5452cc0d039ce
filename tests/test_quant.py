"""Quantized weights (`lsjax.quant`): GGUF blocks held exactly (against gguf-py's own dequantizer),
round-to-nearest within its bound, products and lookups equal to the dequantized weight's, and a
model over quantized weights decoding the same tokens as over the float weights they stand for."""

import os
import subprocess
import sys
from pathlib import Path

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_generate import random_adapter

import native_products

from lsjax import native, quant
from lsjax.convert.gguf import KEPT_TYPES, block_values
from lsjax.errors import ConfigError
from lsjax.generate import Generator
from lsjax.model import forward, model_from_params

BACKENDS = ["xla", "native"] if native.available() else ["xla"]


@pytest.mark.parametrize("kind", list(KEPT_TYPES), ids=lambda k: k.name)
def test_gguf_blocks_are_held_exactly(kind):
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((6, 96)) * rng.uniform(0.01, 3.0, (6, 1))).astype(np.float32)
    raw = gguf.quants.quantize(w, kind)
    q, scale, offset = block_values(raw, kind, w.shape)
    held = quant.from_blocks(q, scale, offset, KEPT_TYPES[kind], 32, axis=-1)
    np.testing.assert_array_equal(np.asarray(held.dequantize()), gguf.quants.dequantize(raw, kind))
    assert held.nbytes < w.nbytes / 3


@pytest.mark.parametrize("scheme,group,axis", [("int8", None, -2), ("int8", 16, -1), ("int4", 16, -2),
                                               ("int4", 32, -1)])
def test_round_to_nearest_within_half_a_step(scheme, group, axis):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((2, 64, 96)).astype(np.float32)
    g = w.shape[axis] if group is None else group
    constant = (0, slice(0, g), 0) if axis == -2 else (0, 0, slice(0, g))
    w[constant] = 0.25  # one group all alike: exact, and no division by its zero step
    qw = quant.quantize(w, scheme, group, axis=axis)
    got = np.asarray(qw.dequantize())
    assert qw.shape == w.shape and got.shape == w.shape
    blocks = np.moveaxis(w, axis, -1).reshape(*np.moveaxis(w, axis, -1).shape[:-1], -1, g)
    if scheme == "int8":
        step = np.abs(blocks).max(-1) / 127
    else:
        step = (blocks.max(-1) - blocks.min(-1)) / 15
    err = np.abs(np.moveaxis(got, axis, -1).reshape(blocks.shape) - blocks).max(-1)
    assert np.all(err <= step / 2 + 1e-6)
    np.testing.assert_array_equal(got[constant], 0.25)
    # a weight already on the grid quantizes to itself
    np.testing.assert_allclose(np.asarray(quant.quantize(got, scheme, group, axis=axis).dequantize()), got,
                               atol=1e-6)


def test_products_and_rows_equal_the_dequantized_weights():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((5, 64)), jnp.float32)
    for scheme in quant.Scheme:
        w = quant.quantize(rng.standard_normal((64, 40)), scheme, 32)
        got = jax.jit(quant.product)(x, w)
        np.testing.assert_allclose(np.asarray(got), np.asarray(x) @ np.asarray(w.dequantize()), rtol=1e-5, atol=1e-5)
        embed = quant.quantize(rng.standard_normal((50, 64)), scheme, 16, axis=-1)
        ids = jnp.array([[3, 49], [0, 3]])
        np.testing.assert_array_equal(np.asarray(jax.jit(lambda e, i: e.rows(i))(embed, ids)),
                                      np.asarray(embed.dequantize())[np.asarray(ids)])


@pytest.mark.skipif(not native.available(), reason="the native CPU library is not built")
def test_native_quantized_products_equal_the_dequantized_weights():
    """The native matvec (integers widened in registers, a group scaled once), as a projection (axis -2)
    and as a tied head (axis -1: x @ W.T), on the widest instruction set here."""
    native_products.check()


@pytest.mark.skipif(not native.available(), reason="the native CPU library is not built")
@pytest.mark.parametrize("simd", native.SIMD_LEVELS[1:])
def test_native_quantized_products_on_each_instruction_set(simd):
    """The narrower kernels (AVX2, portable vectors) a machine without AVX-512 runs, forced here (5 rows:
    a block of four and one more)."""
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from lsjax import native; " \
           "import native_products; native_products.check((1, 5)); print(native.simd())"
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, native.SIMD_ENV: simd},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-1] in (simd, "portable")  # a CPU without AVX2 falls back to portable


def test_an_unknown_instruction_set_is_refused_by_name():
    code = "from lsjax import native; native.available()"
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, native.SIMD_ENV: "avx3"},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "LSJAX_NATIVE_SIMD='avx3' is not an instruction set; expected one of avx512, avx2, portable" in done.stderr


def test_bad_quantization_requests_name_the_problem():
    w = np.ones((48, 8), np.float32)
    with pytest.raises(ConfigError, match=r"quantization 'int3' is not supported; expected one of int8, int4"):
        quant.quantize(w, "int3")
    with pytest.raises(ConfigError, match=r"qkv: group size 32 does not divide its 48 input values"):
        quant.quantize(w, "int8", 32, name="qkv")
    with pytest.raises(ConfigError, match=r"group size must be even; got 3"):
        quant.quantize(w, "int4", 3)


@pytest.fixture(scope="module")
def quantized_models(tiny_llama):
    _, model, tok = tiny_llama
    params = quant.quantize_params(model.params(), "int4", 32)
    return model_from_params(model.config, params), model_from_params(model.config, quant.dequantized(params)), tok


def test_quantized_params_forward_equals_the_dequantized_forward(quantized_models):
    quantized, dequantized, _ = quantized_models
    params = quantized.params()
    assert quant.quantization(params) == "int4:32" and not quant.is_quantized(params["norm"])
    assert quant.is_quantized(params["embed"]) and params["embed"].axis == -1
    ids = jnp.array([[1, 5, 9, 3, 2, 7]])
    np.testing.assert_allclose(np.asarray(forward(quantized.config, params, ids)),
                               np.asarray(forward(dequantized.config, dequantized.params(), ids)), atol=2e-6)


@pytest.mark.parametrize("method,strategy,backend", [(None, "auto", "xla"), ("switch", "fused", "xla"),
                                                     ("lora", "auto", "xla"), ("switch", "fused", BACKENDS[-1]),
                                                     (None, "auto", "pallas"), ("switch", "unmerged", "pallas")])
def test_decoding_over_quantized_weights_equals_decoding_over_their_floats(quantized_models, method, strategy,
                                                                           backend):
    quantized, dequantized, tok = quantized_models
    adapter = None if method is None else random_adapter(quantized, method)
    got = Generator(quantized, tok, adapter, strategy=strategy, backend=backend)
    want = Generator(dequantized, tok, adapter, strategy="unmerged" if method else "auto", backend=backend)
    prompts = ["abc", "hello there"]
    assert got.generate(prompts, max_new_tokens=8).token_ids == want.generate(prompts, max_new_tokens=8).token_ids
    if method is not None:
        assert got.decoder.strategy != "merged"


def test_a_bf16_model_quantized_still_computes_in_bf16(tiny_llama):
    """Scales keep the weights' float type, so a bf16 model's quantized form computes in bf16 and a
    bf16 switch adapter decodes over it, giving the tokens of the same weights dequantized."""
    from lsjax.adapters import Adapter

    _, model, tok = tiny_llama
    params = quant.quantize_params(jax.tree.map(lambda x: x.astype(jnp.bfloat16), model.params()), "int8")
    assert params["embed"].scale.dtype == jnp.bfloat16 and params["layers"].tree[0]["qkv"].scale.dtype == jnp.bfloat16
    quantized = model_from_params(model.config, params)
    dequantized = model_from_params(model.config, quant.dequantized(params))
    assert dequantized.params()["embed"].dtype == jnp.bfloat16
    floats = random_adapter(model, "switch")
    adapter = Adapter.from_arrays(model.config, floats.config,
                                  jax.tree.map(lambda x: x.astype(jnp.bfloat16), floats.arrays()))
    prompts = ["abc", "hello there"]
    got, want = (Generator(m, tok, adapter, strategy="fused", backend="xla").generate(prompts, max_new_tokens=8)
                 for m in (quantized, dequantized))
    assert got.token_ids == want.token_ids


def test_merged_is_refused_over_quantized_weights(quantized_models):
    quantized, _, tok = quantized_models
    with pytest.raises(ConfigError, match=r"strategy 'merged' writes adapter terms into the weights, and this "
                                          r"model's weights are quantized \(int4:32\)"):
        Generator(quantized, tok, random_adapter(quantized, "lora"), strategy="merged")


def test_the_embedded_model_kept_quantized_gives_the_dequantized_conversions_logits(gguf_path, smollm2_ckpt, tmp_path):
    import lsjax
    from lsjax.convert import convert_gguf

    out = convert_gguf(gguf_path, tmp_path / "q", progress=False, keep_quantized=True)
    kept, tok = lsjax.load(out)
    floats, _ = lsjax.load(smollm2_ckpt)
    params = kept.params()
    assert quant.quantization(params) == "int4:32,int8:32"  # Q4_1 projections, a Q8_0 tied embedding
    stored = sum(f.stat().st_size for f in (out / "params").rglob("*") if f.is_file())
    assert stored < 0.3 * sum(f.stat().st_size for f in (smollm2_ckpt / "params").rglob("*") if f.is_file())
    ids = jnp.asarray([tok.encode("The capital of France is Paris, and the capital of Germany is")])
    got = np.asarray(forward(kept.config, params, ids))
    want = np.asarray(forward(floats.config, floats.params(), ids))
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    from tiny import make_hf_model

    folder = tmp_path_factory.mktemp("quant-hf") / "hf"
    make_hf_model(folder)
    return folder


@pytest.mark.parametrize("spec", ["int8", "int4:32"])
def test_a_float_checkpoint_converted_quantized_round_trips_through_orbax(hf_folder, tmp_path, spec):
    import json

    import lsjax
    from lsjax.convert import convert_hf

    floats, _ = lsjax.load(convert_hf(hf_folder, tmp_path / "f", progress=False))
    out = convert_hf(hf_folder, tmp_path / "q", progress=False, quantize=spec)
    model, _ = lsjax.load(out)
    scheme, group = quant.parse_spec(spec)
    want = quant.quantize_params(floats.params(), scheme, group)  # the same rounding, never stored
    ids = jnp.array([[1, 5, 9, 3]])
    np.testing.assert_allclose(np.asarray(forward(model.config, model.params(), ids)),
                               np.asarray(forward(floats.config, want, ids)), atol=1e-6)
    errors = json.loads((out / "lsjax_config.json").read_text())["source"]["quantization_error"]
    head = set() if floats.config.tie_word_embeddings else {"lm_head"}
    assert set(errors) == {"embed", *head, *(f"layers/{p}" for p in ("q", "k", "v", "o", "gate", "up", "down"))}
    assert all(0 < e < (0.02 if scheme == "int8" else 0.2) for e in errors.values()), errors


def test_bad_quantized_conversions_name_the_problem_and_write_nothing(hf_folder, tmp_path, capsys):
    from lsjax.cli import main
    from lsjax.convert import convert_hf
    from lsjax.convert.export import export_hf

    with pytest.raises(ConfigError, match=r"quantize='int3': 'int3' is not a quantization; expected int8 or int4"):
        convert_hf(hf_folder, tmp_path / "a", progress=False, quantize="int3")
    with pytest.raises(ConfigError, match=r"embed: group size 48 does not divide its 64 input values"):
        convert_hf(hf_folder, tmp_path / "b", progress=False, quantize="int8:48")
    assert main(["convert", "--hf", str(hf_folder), "--out", str(tmp_path / "c"), "--keep-quantized"]) != 0
    assert "--keep-quantized keeps a GGUF file's blocks" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
    import lsjax

    model, _ = lsjax.load(convert_hf(hf_folder, tmp_path / "q", progress=False, quantize="int8"))
    with pytest.raises(ConfigError, match=r"export writes float weights, and these weights are quantized \(int8:"):
        export_hf(tmp_path / "export", model.config, model.params())
    assert not (tmp_path / "export").exists()

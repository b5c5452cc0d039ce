"""Loading and decoding on 8 CPU devices: the PartitionSpecs the rules give are the ones the arrays
and the compiled decode step really use, and the numbers equal one device's."""

import json
import os
import subprocess
import sys
import textwrap

from tiny import make_hf_model

from lsjax.convert import convert_hf

SHARDED = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from jax.sharding import Mesh, PartitionSpec as P
    import lsjax
    from lsjax.adapters import Adapter, AdapterConfig
    from lsjax.generate import Generator
    from lsjax.sharding import adapter_shardings
    from flax import nnx
    ckpt = sys.argv[1]
    spec = lambda s, ndim: list(s.spec) + [None] * (ndim - len(s.spec))  # one entry per dim
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    one, tok = lsjax.load(ckpt)
    many, _ = lsjax.load(ckpt, mesh=mesh)
    layer = many.params()["layers"].layer(1)
    out = {"devices": len(jax.devices()),
           "specs": {name: spec(layer[name].sharding, layer[name].ndim)
                     for name in ("qkv", "o", "gate_up", "down", "attn_norm")},
           "embed": spec(many.params()["embed"].sharding, 2),
           "shards": {name: [list(layer[name].shape), list(layer[name].addressable_shards[0].data.shape)]
                      for name in ("qkv", "down")}}
    ids = np.array([[5, 9, 17, 33, 2, 61, 40]])
    out["forward_diff"] = float(np.abs(np.asarray(many(ids)) - np.asarray(one(ids))).max())
    cfg = AdapterConfig(method="switch", num_experts=4, top_k=2, rank=4)
    arrays = jax.tree.map(lambda x: x + 0.05, Adapter(one.config, cfg, rngs=nnx.Rngs(0)).arrays())
    adapter_one = Adapter.from_arrays(one.config, cfg, arrays)
    placed = jax.tree.map(jax.device_put, arrays, adapter_shardings(arrays, mesh))
    adapter_many = Adapter.from_arrays(one.config, cfg, placed)
    prompts = [[5, 6, 7, 8], [20, 21, 22, 23, 24, 25]]
    want = Generator(one, tok, adapter_one, backend="xla").generate(prompts, max_new_tokens=6, stop_token_ids=())
    gen = Generator(many, tok, adapter_many)
    got = gen.generate(prompts, max_new_tokens=6, stop_token_ids=())
    out["backend"] = gen.backend.name
    out["same_tokens"] = got.token_ids == want.token_ids
    _, ids_, mask, cache, *_ = gen._setup(prompts, False, 6, None, ())
    compiled = gen._step.lower(gen.bundle, np.zeros(2, np.int32), cache).compile()
    bundle_in = compiled.input_shardings[0][0]
    out["step_specs"] = {name: spec(bundle_in["base"]["layers"].layer(1)[name], 2) for name in ("qkv", "down")}
    out["step_expert_spec"] = spec(bundle_in["adapter"]["experts"]["qkv"]["a"], 4)
    print("RESULT" + json.dumps(out))
""")


def test_load_and_decode_on_8_devices(tmp_path):
    make_hf_model(tmp_path / "hf")
    convert_hf(tmp_path / "hf", tmp_path / "ckpt", progress=False)
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8")
    proc = subprocess.run([sys.executable, "-c", SHARDED, str(tmp_path / "ckpt")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT")[-1])
    assert out["devices"] == 8
    # column-parallel products split d_out over tensor, row-parallel ones d_in; d_in / d_out over fsdp
    assert out["specs"] == {"qkv": ["fsdp", "tensor"], "o": ["tensor", "fsdp"], "gate_up": ["fsdp", "tensor"],
                            "down": ["tensor", "fsdp"], "attn_norm": [None]}, out
    assert out["embed"] == ["tensor", "fsdp"]
    for whole, shard in out["shards"].values():  # each device really holds a quarter of the weight
        assert shard == [whole[0] // 2, whole[1] // 2], out["shards"]
    assert out["forward_diff"] <= 1e-5
    # the decode step runs on the sharded arrays as they are (no gather onto one device first)
    assert out["step_specs"] == {"qkv": ["fsdp", "tensor"], "down": ["tensor", "fsdp"]}, out
    assert out["step_expert_spec"] == [None, None, "fsdp", None], out
    assert out["backend"] == "xla" and out["same_tokens"], out

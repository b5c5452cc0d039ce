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


ENGINE = textwrap.dedent("""
    import json, sys, threading
    import jax, numpy as np
    import lsjax
    from lsjax.adapters import Adapter, AdapterConfig
    from lsjax.adapters.table import served
    from lsjax.sharding import tensor_mesh
    from lsjax.decoder import Decoder
    from lsjax.serve import Engine, EngineConfig, Request
    from flax import nnx
    ckpt = sys.argv[1]
    spec = lambda s, ndim: list(s.spec) + [None] * (ndim - len(s.spec))
    mesh = tensor_mesh(8)

    def adapter(model, method, seed, **kw):
        cfg = AdapterConfig(method=method, rank=4, **kw)
        arrays = jax.tree.map(lambda x: x + 0.05 * (seed + 1), Adapter(model.config, cfg, rngs=nnx.Rngs(seed)).arrays())
        return Adapter.from_arrays(model.config, cfg, arrays)

    def serve(mesh):
        model, tok = lsjax.load(ckpt, mesh=mesh)
        named = {"s1": adapter(model, "switch", 0, num_experts=4), "s2": adapter(model, "switch", 1, num_experts=2,
                 top_k=1), "l1": adapter(model, "lora", 2)}
        table = served(model.config, named, runtime=True, room={"adapters": 4}, mesh=mesh)
        engine = Engine(Decoder(model, table, strategy="unmerged", backend="xla", rows=4), tok,
                        EngineConfig(slots=4, max_len=64, prefill_chunk=16)).start()
        engine.warmup()
        compiled = engine.compile_count()
        rng = np.random.default_rng(0)
        names = ["s1", "s2", "l1", None]
        requests = [Request(tuple(int(t) for t in rng.integers(3, 120, size=int(rng.integers(2, 45)))),
                            max_tokens=int(rng.integers(4, 12)), stop_ids=(), adapter=names[i % 4]) for i in range(8)]
        handles = [engine.submit(r) for r in requests[:4]]
        engine.load_adapter("l2", adapter(model, "lora", 3, targets=["q", "v"]))
        handles += [engine.submit(r) for r in requests[4:]] + [engine.submit(Request((5, 6, 7), 8, stop_ids=(),
                                                                                     adapter="l2"))]
        tokens = [h.result(timeout=300).token_ids for h in handles]
        out = {"tokens": tokens, "recompiled": engine.compile_count() - compiled}
        if mesh is not None:
            d = engine.decoder
            args = (d.bundle, engine.tokens, engine.cache, *[np.zeros(4, t) for t in (np.int32, np.int32, np.float32,
                                                                                         np.int32, np.float32, bool)])
            compiled = engine.fns["decode"].lower(*args).compile()
            bundle = compiled.input_shardings[0][0]
            layer = bundle["base"]["layers"].layer(1)
            out["specs"] = {name: spec(layer[name], 2) for name in ("qkv", "o", "gate_up", "down")}
            out["experts"] = {k: spec(bundle["adapter"]["experts"]["qkv"][k], 4) for k in ("a", "b")}
            out["shard"] = list(d.bundle["adapter"]["experts"]["qkv"]["b"].addressable_shards[0].data.shape)
            out["whole"] = list(d.bundle["adapter"]["experts"]["qkv"]["b"].shape)
            held = engine.cache.k.layer(0)
            out["cache"] = [spec(held.sharding, 3), spec(compiled.input_shardings[0][2].k.layer(0), 3),
                            list(held.shape), list(held.addressable_shards[0].data.shape)]
        engine.stop()
        return out

    print("RESULT" + json.dumps({"devices": len(jax.devices()), "one": serve(None), "many": serve(mesh)}))
""")


def test_engine_over_8_devices_serves_mixed_adapters_as_one(tmp_path):
    """A serving engine whose weights, adapter table and cache span 8 devices (tensor parallel): the
    greedy tokens of requests over three adapters and the base, and of an adapter loaded while they
    run, equal one device's; nothing compiles after the warm-up; the compiled step takes the
    weights and experts split as the rules say."""
    make_hf_model(tmp_path / "hf")
    convert_hf(tmp_path / "hf", tmp_path / "ckpt", progress=False)
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8")
    proc = subprocess.run([sys.executable, "-c", ENGINE, str(tmp_path / "ckpt")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT")[-1])
    assert out["devices"] == 8
    assert out["many"]["tokens"] == out["one"]["tokens"]
    assert out["many"]["recompiled"] == 0 and out["one"]["recompiled"] == 0
    assert out["many"]["specs"] == {"qkv": [None, "tensor"], "o": ["tensor", None], "gate_up": [None, "tensor"],
                                    "down": ["tensor", None]}, out["many"]
    assert out["many"]["experts"] == {"a": [None, None, None, None], "b": [None, None, None, "tensor"]}
    whole, shard = out["many"]["whole"], out["many"]["shard"]
    assert shard == whole[:3] + [whole[3] // 8]  # each device holds an eighth of B's columns
    # the cache `[KV*slots, T, D]` (2 kv heads x 4 slots) split over kv heads, then rows: one (head, row) each
    held, compiled, cache, piece = out["many"]["cache"]
    assert held == compiled == ["tensor", None, None], out["many"]["cache"]
    assert cache[0] == 2 * 4 and piece == [1, *cache[1:]]

"""Adapter files: lsjax's own format, PEFT both ways (checked by the real `peft` library), and a
merged HF export that transformers loads; plus every bad-file case, naming the key or field."""

import json
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from tiny import make_hf_model

from lsjax.adapters import (AdapterConfig, AdapterError, adapted_forward, export_merged_hf, export_peft, grouped,
                            import_peft, init_params, load_adapter, load_adapter_arrays, merge_lora, per_projection,
                            save_adapter, save_adapter_arrays)
from lsjax.config import ModelConfig
from lsjax.convert.assemble import assemble
from lsjax.convert.hf import lazy_tensors, read_hf_config, safetensors_files
from lsjax.errors import ConfigError
from lsjax.model import from_projections

IDS = np.array([[1, 17, 42, 99, 5, 63, 120, 8, 31]], np.int32)
TOL = 1e-4


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """A tiny random transformers Llama on disk and its lsjax config and params."""
    folder = tmp_path_factory.mktemp("hf") / "model"
    make_hf_model(folder)
    config, _ = read_hf_config(folder)
    tensors = lazy_tensors(safetensors_files(folder))
    return folder, config, from_projections(config, assemble(config, tensors, np.float32, progress=False))


@pytest.fixture(scope="module")
def run():
    return jax.jit(adapted_forward, static_argnums=(0, 2))


def load_hf(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="eager").eval()


def torch_logits(model, ids=IDS):
    import torch

    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long)).logits.numpy()


def random_params(config, adapter_config, seed=0, std=0.1):
    params = init_params(config, adapter_config, jax.random.key(seed))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: rng.normal(0, std, a.shape).astype(np.float32), params)


ROUTED = {
    "lora": dict(method="lora", targets=("q", "v", "down")),
    "switch": dict(method="switch", num_experts=4, top_k=2, targets=("gate", "up", "down")),
    "layerwise": dict(method="layerwise", num_experts=3, top_k=2),
    "blockwise": dict(method="blockwise", num_experts=4, top_k=1, targets=("k", "up", "down")),
}


# -- lsjax adapter files -------------------------------------------------------------------------
@pytest.mark.parametrize("method", list(ROUTED))
def test_save_load_round_trip(hf, tmp_path, method):
    _, config, _ = hf
    cfg = AdapterConfig(rank=4, alpha=8.0, **ROUTED[method])
    params = random_params(config, cfg)
    save_adapter_arrays(tmp_path / "a", config, cfg, params)
    meta = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert meta["format"] == "lsjax-adapter" and meta["adapter"]["method"] == method
    assert meta["base"]["hidden_size"] == 64 and meta["base"]["projection_shapes"]["k"] == [64, 32]
    stored = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    per = per_projection(config, cfg, params)  # the file holds one tensor per projection
    for p in cfg.targets:
        np.testing.assert_array_equal(stored[f"layers.{p}.lora_A"], per["experts"][p]["a"])
        np.testing.assert_array_equal(stored[f"layers.{p}.lora_B"], per["experts"][p]["b"])
    router_keys = {k for k in stored if "router" in k}
    assert router_keys == {"switch": {"router.weight"}, "lora": set(), "blockwise": {"layers.ffn.router.weight"},
                           "layerwise": {f"layers.{p}.router.weight" for p in cfg.targets}}[method]

    back_cfg, back = load_adapter_arrays(tmp_path / "a", config, expect=cfg)
    assert back_cfg == cfg
    jax.tree.map(np.testing.assert_array_equal, back, params)
    module = load_adapter(tmp_path / "a", config)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, module.arrays()), params)
    save_adapter(tmp_path / "b", module)
    assert load_file(str(tmp_path / "b" / "adapter_model.safetensors")).keys() == stored.keys()


@pytest.fixture()
def saved(hf, tmp_path):
    _, config, _ = hf
    cfg = AdapterConfig(rank=4, **ROUTED["switch"])
    folder = save_adapter_arrays(tmp_path / "a", config, cfg, random_params(config, cfg))
    return folder, config, cfg


def rewrite(folder, change):
    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))


def test_adapter_for_another_base_shape_is_refused(saved):
    folder, config, _ = saved
    other = ModelConfig(**{**config.to_dict(), "rope": config.rope, "intermediate_size": 80})
    with pytest.raises(AdapterError, match=r"saved for a base with intermediate_size=96; this model has "
                                           r"intermediate_size=80"):
        load_adapter_arrays(folder, other)
    deeper = ModelConfig(**{**config.to_dict(), "rope": config.rope, "num_layers": 3})
    with pytest.raises(AdapterError, match="num_layers=2; this model has num_layers=3"):
        load_adapter_arrays(folder, deeper)


def test_adapter_for_another_method_is_refused(saved):
    folder, config, cfg = saved
    with pytest.raises(AdapterError, match=r'saved with method="switch"; expected method="layerwise"'):
        load_adapter_arrays(folder, config, expect=cfg.replace(method="layerwise"))
    with pytest.raises(AdapterError, match=r'saved with top_k=2; expected top_k=1'):
        load_adapter_arrays(folder, config, expect=cfg.replace(top_k=1))


def test_missing_extra_and_misshapen_tensors_are_named(saved):
    folder, config, _ = saved
    rewrite(folder, lambda t: t.pop("router.weight"))
    with pytest.raises(AdapterError, match=r"missing tensor 'router.weight' \(needed by method 'switch'"):
        load_adapter_arrays(folder, config)
    rewrite(folder, lambda t: t.update({"router.weight": np.zeros((64, 4), np.float32),
                                        "layers.q.lora_A": np.zeros((2, 4, 64, 4), np.float32)}))
    with pytest.raises(AdapterError, match=r"unexpected tensor 'layers.q.lora_A' \(not used by method 'switch', "
                                           r"targets \['gate', 'up', 'down'\]\)"):
        load_adapter_arrays(folder, config)
    rewrite(folder, lambda t: (t.pop("layers.q.lora_A"),
                               t.update({"layers.up.lora_B": np.zeros((2, 4, 4, 95), np.float32)})))
    with pytest.raises(AdapterError, match=r"tensor 'layers.up.lora_B' has shape \[2, 4, 4, 95\]; "
                                           r"expected \[2, 4, 4, 96\]"):
        load_adapter_arrays(folder, config)


def test_bad_adapter_folders(saved, tmp_path):
    folder, config, _ = saved
    meta_path = folder / "adapter_config.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "adapter": {**meta["adapter"], "top_k": 9}}))
    with pytest.raises(ConfigError, match=r"adapter_config.json: top_k=9 is invalid; expected an integer in \[1, "
                                          r"num_experts=4\]"):
        load_adapter_arrays(folder, config)
    meta_path.write_text(json.dumps({**meta, "version": 7}))
    with pytest.raises(AdapterError, match="format 'lsjax-adapter' version 7; expected 'lsjax-adapter' version 1"):
        load_adapter_arrays(folder, config)
    meta_path.write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    with pytest.raises(AdapterError, match="this is a PEFT adapter; load it with lsjax.adapters.import_peft"):
        load_adapter_arrays(folder, config)
    with pytest.raises(AdapterError, match="missing adapter_config.json"):
        load_adapter_arrays(tmp_path / "nowhere", config)
    meta_path.write_text(json.dumps(meta))
    (folder / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    with pytest.raises(AdapterError, match="corrupt or unreadable safetensors file"):
        load_adapter_arrays(folder, config)


# -- PEFT ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora(hf):
    _, config, _ = hf
    cfg = AdapterConfig(method="lora", rank=4, alpha=8.0, targets="all-linear")
    return cfg, random_params(config, cfg, seed=3)


def test_peft_export_loads_in_peft_with_the_same_logits(hf, lora, run, tmp_path):
    from peft import PeftModel

    folder, config, base = hf
    cfg, params = lora
    export_peft(tmp_path / "peft", config, cfg, params)
    keys = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert keys["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 64)
    assert keys["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"].shape == (64, 4)
    model = PeftModel.from_pretrained(load_hf(folder), str(tmp_path / "peft")).eval()
    want = torch_logits(model)
    got, _ = run(config, base, cfg, params, IDS)
    assert np.abs(np.asarray(got) - want).max() <= TOL
    plain = torch_logits(load_hf(folder))
    assert np.abs(plain - want).max() > 1e-2  # the adapter did something
    back_cfg, back = import_peft(tmp_path / "peft", config)
    assert (back_cfg.rank, back_cfg.alpha, back_cfg.targets) == (4, 8.0, cfg.targets)
    jax.tree.map(np.testing.assert_array_equal, back, params)


@pytest.mark.parametrize("rslora", [False, True])
def test_adapter_made_by_peft_imports_with_the_same_logits(hf, run, tmp_path, rslora):
    import torch
    from peft import LoraConfig, get_peft_model

    folder, config, base = hf
    torch.manual_seed(0)
    peft_config = LoraConfig(r=4, lora_alpha=6, lora_dropout=0.0, use_rslora=rslora,
                             target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"])
    model = get_peft_model(load_hf(folder), peft_config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    model.save_pretrained(str(tmp_path / "peft"))
    want = torch_logits(model)
    cfg, params = import_peft(tmp_path / "peft", config)
    assert cfg.targets == ("q", "v", "o", "up", "down") and cfg.method == "lora"
    assert cfg.scale == pytest.approx(6 / 2 if rslora else 6 / 4)
    got, _ = run(config, base, cfg, params, IDS)
    assert np.abs(np.asarray(got) - want).max() <= TOL


def test_merged_export_loads_in_transformers_with_the_adapted_logits(hf, lora, run, tmp_path):
    folder, config, base = hf
    cfg, params = lora
    export_merged_hf(tmp_path / "merged", config, base, cfg, params)
    want, _ = run(config, base, cfg, params, IDS)
    got = torch_logits(load_hf(tmp_path / "merged"))
    assert np.abs(got - np.asarray(want)).max() <= TOL
    # merging leaves the base params untouched
    again = assemble(config, lazy_tensors(safetensors_files(folder)), np.float32, progress=False)
    jax.tree.map(np.testing.assert_array_equal, base, from_projections(config, again))


def test_routed_adapters_neither_merge_nor_export_to_peft(hf, tmp_path):
    _, config, base = hf
    cfg = AdapterConfig(rank=4, **ROUTED["switch"])
    params = random_params(config, cfg)
    with pytest.raises(AdapterError, match="PEFT export holds plain LoRA only; method='switch'"):
        export_peft(tmp_path / "p", config, cfg, params)
    with pytest.raises(AdapterError, match="only method 'lora' merges into fixed weights; method='switch'"):
        merge_lora(config, base, cfg, params)


@pytest.fixture()
def peft_folder(hf, lora, tmp_path):
    _, config, _ = hf
    cfg, params = lora
    per = per_projection(config, cfg, params)
    q_down = cfg.replace(targets=("q", "down"))
    return export_peft(tmp_path / "peft", config, q_down,
                       grouped(config, q_down,
                               {"experts": {p: per["experts"][p] for p in ("q", "down")}, "routers": {}}))


def edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("changes,message", [
    (dict(use_dora=True), "use_dora=True is not supported; expected False"),
    (dict(bias="all"), "bias='all' is not supported; expected 'none'"),
    (dict(rank_pattern={"q_proj": 8}), "rank_pattern={'q_proj': 8} is not supported"),
    (dict(layers_to_transform=[0]), "layers_to_transform=[0] is not supported"),
    (dict(peft_type="IA3"), "peft_type='IA3'; expected 'LORA'"),
    (dict(target_modules=["q_proj", "lm_head"]), "target_modules entry 'lm_head' is not supported"),
    (dict(target_modules=["q_proj", "down_proj", "k_proj"]),
     "missing tensor 'base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight'"),
    (dict(target_modules=["down_proj"]),
     "unexpected tensor 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight'"),
    (dict(r=8), "tensor 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' has shape [4, 64]; "
                "expected [8, 64]"),
])
def test_bad_peft_adapters_are_refused_by_name(hf, peft_folder, changes, message):
    _, config, _ = hf
    edit_config(peft_folder, **changes)
    with pytest.raises(AdapterError) as err:
        import_peft(peft_folder, config)
    assert message in str(err.value)


def test_peft_tensor_for_a_missing_layer_or_module(hf, peft_folder):
    _, config, _ = hf
    path = peft_folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    tensors["base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight"] = np.zeros((4, 64), np.float32)
    save_file(tensors, str(path))
    with pytest.raises(AdapterError, match=r"unexpected tensor 'base_model.model.model.layers.2.self_attn.q_proj"
                                           r".lora_A.weight' .*num_hidden_layers=2"):
        import_peft(peft_folder, config)
    edit_config(peft_folder, target_modules=".*embed_tokens")  # a regex: targets come from the keys
    tensors.pop("base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight")
    tensors["base_model.model.model.layers.0.self_attn.rotary.lora_A.weight"] = np.zeros((4, 64), np.float32)
    save_file(tensors, str(path))
    with pytest.raises(AdapterError, match="adapts 'rotary', which lsjax does not support"):
        import_peft(peft_folder, config)
    shutil.rmtree(peft_folder)
    with pytest.raises(AdapterError, match="missing adapter_config.json"):
        import_peft(peft_folder, config)


@pytest.mark.parametrize("kwargs", [
    dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 16}, rope_theta=500000.0),
    dict(model_type="mistral", sliding_window=4, tie_word_embeddings=True),
], ids=["llama3-rope", "mistral-tied-window"])
def test_hf_export_writes_a_config_transformers_reads(tmp_path, kwargs):
    """Without the source's config.json, export_hf builds one from ModelConfig (RoPE, ties, window)."""
    from lsjax.convert import export_hf
    from lsjax.model import forward

    make_hf_model(tmp_path / "hf", **kwargs)
    config, _ = read_hf_config(tmp_path / "hf")
    params = assemble(config, lazy_tensors(safetensors_files(tmp_path / "hf")), np.float32, progress=False)
    export_hf(tmp_path / "out", config, from_projections(config, params))
    assert read_hf_config(tmp_path / "out")[0] == config
    ids = np.arange(3, 30)[None]
    got = torch_logits(load_hf(tmp_path / "out"), ids)
    assert np.abs(got - np.asarray(forward(config, from_projections(config, params), ids))).max() <= TOL

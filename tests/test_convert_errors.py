"""Bad input to conversion and loading: a clear error naming the culprit, and nothing left behind."""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from tiny import make_hf_model

import lsjax
from lsjax.convert import convert_hf
from lsjax.errors import CheckpointError, ConfigError, ConversionError


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / "model"
    make_hf_model(folder)
    return folder


@pytest.fixture
def broken(hf_dir, tmp_path):
    """A fresh copy of the good folder to break."""
    dst = tmp_path / "broken"
    shutil.copytree(hf_dir, dst)
    return dst


def rewrite_tensors(folder, edit):
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def edit_config(folder, **changes):
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    path.write_text(json.dumps(cfg))


def assert_fails_cleanly(folder, out, error, match):
    with pytest.raises(error, match=match):
        convert_hf(folder, out, progress=False)
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.partial")]


def test_missing_tensor(broken, tmp_path):
    rewrite_tensors(broken, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    assert_fails_cleanly(broken, tmp_path / "out", ConversionError,
                         r"missing tensor\(s\) \['model\.layers\.1\.mlp\.up_proj\.weight'\]")


def test_wrong_shape(broken, tmp_path):
    def edit(t):
        t["model.layers.0.self_attn.k_proj.weight"] = np.zeros((31, 64), np.float32)
    rewrite_tensors(broken, edit)
    assert_fails_cleanly(broken, tmp_path / "out", ConversionError,
                         r"model\.safetensors: tensor 'model\.layers\.0\.self_attn\.k_proj\.weight' has shape "
                         r"\[31, 64\]; expected \[32, 64\]")


def test_wrong_dtype(broken, tmp_path):
    def edit(t):
        t["model.norm.weight"] = np.ones((64,), np.int32)
    rewrite_tensors(broken, edit)
    assert_fails_cleanly(broken, tmp_path / "out", ConversionError,
                         r"tensor 'model\.norm\.weight' has dtype I32; expected a floating dtype")


@pytest.mark.parametrize("bad, where", [(np.nan, ""), (np.inf, ""), (1e6, " after the cast to float16")])
def test_nonfinite_weights_are_refused_by_name_unless_allowed(broken, tmp_path, bad, where):
    def edit(t):
        t["model.layers.1.self_attn.v_proj.weight"][3, 5] = bad
    rewrite_tensors(broken, edit)
    dtype = "float16" if where else None
    with pytest.raises(ConversionError, match=r"tensor 'model\.layers\.1\.self_attn\.v_proj\.weight' holds 1 NaN or "
                                              rf"Inf value\(s\){where} \(the first at index \[3, 5\]\)"):
        convert_hf(broken, tmp_path / "out", dtype=dtype, progress=False)
    assert not (tmp_path / "out").exists()
    convert_hf(broken, tmp_path / "out", dtype=dtype, progress=False, allow_nonfinite=True)
    _, params = lsjax.checkpoint.load_params(tmp_path / "out")
    assert not np.isfinite(np.asarray(params["layers"].layer(1)["qkv"], np.float32)).all()  # converted as asked


def test_unexpected_tensor(broken, tmp_path):
    def edit(t):
        t["model.layers.5.mlp.up_proj.weight"] = np.ones((96, 64), np.float32)
    rewrite_tensors(broken, edit)
    assert_fails_cleanly(broken, tmp_path / "out", ConversionError,
                         r"unexpected tensor 'model\.layers\.5\.mlp\.up_proj\.weight' "
                         r"\(layer 5 but num_hidden_layers=2\)")


@pytest.mark.parametrize("changes, match", [
    (dict(model_type="gpt2"),
     r"config\.json: model_type 'gpt2' is not supported; expected one of \('llama', 'mistral'\)"),
    (dict(hidden_act="gelu"), r"hidden_act 'gelu' is not supported"),
    (dict(attention_bias=True), r"attention_bias=true is not supported"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}),
     r"rope_scaling type 'yarn' is not supported; expected one of \('default', 'linear', 'llama3'\)"),
    (dict(num_key_value_heads=3), r"num_key_value_heads=3 is invalid; expected a divisor of num_attention_heads=4"),
    (dict(hidden_size=None), r"missing required field 'hidden_size'"),
])
def test_bad_config(broken, tmp_path, changes, match):
    edit_config(broken, **changes)
    assert_fails_cleanly(broken, tmp_path / "out", ConfigError, match)


def test_missing_config(broken, tmp_path):
    (broken / "config.json").unlink()
    assert_fails_cleanly(broken, tmp_path / "out", ConversionError, r"missing config\.json")


def test_missing_tokenizer(broken, tmp_path):
    (broken / "tokenizer.json").unlink()
    assert_fails_cleanly(broken, tmp_path / "out", ConversionError, r"missing tokenizer\.json")


def test_missing_weights(broken, tmp_path):
    (broken / "model.safetensors").unlink()
    assert_fails_cleanly(broken, tmp_path / "out", ConversionError,
                         r"no model\.safetensors or model\.safetensors\.index\.json found")


def test_corrupt_safetensors_header(broken, tmp_path):
    path = broken / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:24] = b"#" * 16  # garble the start of the JSON header
    path.write_bytes(bytes(data))
    assert_fails_cleanly(broken, tmp_path / "out", ConversionError,
                         r"model\.safetensors: corrupt or unreadable safetensors")


def test_missing_shard(tmp_path):
    folder = tmp_path / "sharded"
    make_hf_model(folder, shard_size="40KB")
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    shard.unlink()
    assert_fails_cleanly(folder, tmp_path / "out", ConversionError,
                         rf"names shard '{shard.name}', which does not exist")


def test_output_exists(hf_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="output path already exists"):
        convert_hf(hf_dir, out, progress=False)
    assert (out / "keep.txt").read_text() == "mine"


def test_interrupted_save_leaves_nothing(hf_dir, tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    def boom(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(ocp.StandardCheckpointer, "save", boom)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        convert_hf(hf_dir, out, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_load_errors(tmp_path):
    with pytest.raises(CheckpointError, match=r"not an lsjax checkpoint \(missing lsjax_config\.json\)"):
        lsjax.load(tmp_path)
    with pytest.raises(ConfigError, match=r"dtype 'int8' is not supported"):
        from lsjax.checkpoint import as_dtype
        as_dtype("int8")

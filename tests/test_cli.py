"""The `lsjax` command line: conversion works end to end, bad input is one clear line, exit 2."""

import re

import numpy as np
from tiny import make_hf_model, ragged_batch

import lsjax
from lsjax.cli import main


def test_convert_hf_and_refuse_existing(tmp_path, capsys):
    make_hf_model(tmp_path / "hf")
    assert main(["convert", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt"), "--dtype", "bf16"]) == 0
    model, _ = lsjax.load(tmp_path / "ckpt")
    assert model.dtype == np.dtype("bfloat16")
    ids, mask, _ = ragged_batch([5, 3])
    assert np.isfinite(np.asarray(model(ids, mask))).all()

    assert main(["convert", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt")]) == 2
    err = capsys.readouterr().err
    assert "lsjax convert: error:" in err and "output path already exists" in err
    assert "Traceback" not in err


def test_convert_missing_folder(tmp_path, capsys):
    assert main(["convert", "--hf", str(tmp_path / "nope"), "--out", str(tmp_path / "ckpt")]) == 2
    assert "nope: not a folder" in capsys.readouterr().err
    assert not (tmp_path / "ckpt").exists()


def test_generate_streams_with_adapter(tmp_path, capsys):
    import jax
    from flax import nnx

    from lsjax.adapters import Adapter, AdapterConfig, save_adapter
    from lsjax.generate import Generator

    make_hf_model(tmp_path / "hf")
    assert main(["convert", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt")]) == 0
    model, tok = lsjax.load(tmp_path / "ckpt")
    cfg = AdapterConfig(method="switch", num_experts=4, top_k=2, rank=4, targets="all-linear")
    arrays = jax.tree.map(lambda x: x + 0.1, Adapter(model.config, cfg, rngs=nnx.Rngs(0)).arrays())
    adapter = Adapter.from_arrays(model.config, cfg, arrays)
    save_adapter(tmp_path / "adapter", adapter)
    capsys.readouterr()
    assert main(["generate", "hello", "--raw", "--ckpt", str(tmp_path / "ckpt"), "--adapter", str(tmp_path / "adapter"),
                 "--max-new-tokens", "6"]) == 0
    captured = capsys.readouterr()
    gen = Generator(model, tok, adapter)
    assert captured.out == gen.generate(["hello"], max_new_tokens=6).texts[0]
    assert f"strategy {gen.strategy}; backend {gen.backend.name}" in captured.err
    pick = gen.decoder.tuning.pick  # auto: what was measured fastest here
    assert (gen.backend.name, gen.strategy) == (pick.backend, pick.strategy)
    if gen.backend.name == "native":  # how much depends on where the arrays landed
        assert re.search(r"; \d+ MiB on huge pages]", captured.err)
    tokens = len(gen.generate(["hello"], max_new_tokens=6).token_ids[0])
    assert re.search(rf"; {tokens} tokens; first token \d+\.\d\d s \(with compiling\)"
                     + (r", then \d+\.\d ms/token;" if tokens > 2 else ";"), captured.err)

    # bfloat16 experts: the completion of the adapter holding those values, on the decoder auto picks
    assert main(["generate", "hello", "--raw", "--ckpt", str(tmp_path / "ckpt"), "--adapter", str(tmp_path / "adapter"),
                 "--max-new-tokens", "6", "--expert-dtype", "bf16"]) == 0
    half = Generator(model, tok, adapter.astype(jax.numpy.bfloat16).astype(jax.numpy.float32), backend="xla")
    assert capsys.readouterr().out == half.generate(["hello"], max_new_tokens=6).texts[0]
    assert main(["generate", "hello", "--ckpt", str(tmp_path / "nowhere"), "--expert-dtype", "int8"]) == 2
    err = capsys.readouterr().err
    assert "dtype 'int8' is not supported" in err and "Traceback" not in err

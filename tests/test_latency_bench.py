"""`lsjax bench decode` end to end on a tiny model: a record per config, ratios from the same run."""

import json

from tiny import make_hf_model

import lsjax
from lsjax.cli import main
from lsjax.convert import convert_hf
from lsjax.eval.latency import Record, latency_table, random_adapter, time_decode


def test_bench_decode_writes_table_json_and_plot(tmp_path, capsys):
    make_hf_model(tmp_path / "hf")
    convert_hf(tmp_path / "hf", tmp_path / "ckpt", progress=False)
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    assert main(["bench", "decode", "--ckpt", str(tmp_path / "ckpt"), "--methods", "base,lora,switch",
                 "--batch", "1,2", "--rounds", "2", "--new-tokens", "4", "--prompt-len", "5", "--experts", "4",
                 "--rank", "4", "--json", str(out), "--plot", str(png)]) == 0
    data = json.loads(out.read_text())
    records = data["records"]
    keys = {(r["method"], r["strategy"], r["batch"]) for r in records}
    assert keys == {("base", "-", 1), ("base", "-", 2), ("lora", "merged", 1), ("lora", "merged", 2),
                    ("lora", "unmerged", 1), ("lora", "unmerged", 2), ("switch", "unmerged", 1),
                    ("switch", "unmerged", 2), ("switch", "fused", 1), ("switch", "fused", 2), ("switch", "merged", 1)}
    for r in records:
        base = next(b for b in records if b["method"] == "base" and b["batch"] == r["batch"])
        assert r["ms_per_token"] > 0 and r["rounds"] == 2 and r["dtype"] == "float32"
        assert abs(r["ratio_to_base"] - r["ms_per_token"] / base["ms_per_token"]) < 1e-9
    base1 = next(r for r in records if r["method"] == "base" and r["batch"] == 1)
    meta = data["meta"]
    assert base1["floor_ms"] > 0 and meta["copy_gb_s"] > 0 and meta["read_gb_s"] > 0
    assert abs(meta["floor_ms"] - meta["weight_bytes"] / meta["copy_gb_s"] / 1e6) < 1e-9
    assert abs(meta["read_floor_ms"] - meta["weight_bytes"] / meta["read_gb_s"] / 1e6) < 1e-9
    assert png.stat().st_size > 1000
    # a run saved before the read floor existed still renders (the reproduction re-renders saved runs)
    old_meta = {k: v for k, v in meta.items() if not k.startswith("read_")}
    table = latency_table([Record(**r) for r in records], old_meta)
    assert "read floor" not in table and f"memory floor {meta['floor_ms']:.1f} ms/token" in table
    assert "| switch | merged | 1 |" in capsys.readouterr().out


def test_a_failing_configuration_is_reported_and_the_rest_timed(tmp_path):
    make_hf_model(tmp_path / "hf")
    convert_hf(tmp_path / "hf", tmp_path / "ckpt", progress=False)
    model, tok = lsjax.load(tmp_path / "ckpt")

    class Args:
        experts, top_k, rank, targets, dtype = 4, 2, 4, "all-linear", "float32"

    layerwise = random_adapter(model.config, "layerwise", Args)
    entries = [("base", "-", None), ("layerwise", "merged", layerwise), ("layerwise", "unmerged", layerwise)]
    records, meta = time_decode(model, tok, entries, [1], prompt_len=5, new_tokens=3, rounds=1, progress=False)
    assert [(r.method, r.strategy) for r in records] == [("base", "-"), ("layerwise", "unmerged")]
    assert len(meta["failed"]) == 1 and meta["failed"][0].startswith("layerwise/merged: ConfigError")
    assert "'merged' is for methods 'lora' and 'switch'" in meta["failed"][0]


def test_matvec_probe_reports_consistent_figures(tmp_path):
    from lsjax.eval.matvec_probe import main as probe

    out = tmp_path / "probe.json"
    result = probe(["--layers", "2", "--hidden", "64", "--ffn", "128", "--experts", "4", "--rank", "4",
                    "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["weight_bytes"] == 2 * 4 * (2 * 64 * 64 + 3 * 64 * 128)
    ms = saved["ms"]
    for form, extra in saved["routed_extra_ms"].items():
        assert abs(extra - (ms[f"chain + routed {form}"] - ms["chain"])) < 1e-9
    assert abs(saved["chain_gb_s"] - saved["weight_bytes"] / ms["chain"] / 1e6) < 1e-6
    assert result["copy_gb_s"] > 0 and result["read_gb_s"] > 0
    assert saved["gathered_vs_dense_max_abs"] < 1e-5

"""`lsjax bench decode` end to end on a tiny model: a record per config, ratios from the same run."""

import json

from tiny import make_hf_model

from lsjax.cli import main
from lsjax.convert import convert_hf


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
    assert base1["floor_ms"] > 0 and data["meta"]["copy_gb_s"] > 0
    assert png.stat().st_size > 1000
    assert "| switch | merged | 1 |" in capsys.readouterr().out

"""`lsjax bench decode` end to end on a tiny model: a record per config, ratios from the same run."""

import json

import pytest

from tiny import make_hf_model

import lsjax
from lsjax.autotune import Candidate, candidates
from lsjax.backends import XLA
from lsjax.cli import main
from lsjax.convert import convert_hf
from lsjax.eval import latency
from lsjax.eval.latency import Record, latency_table, random_adapter, time_decode


def test_bench_decode_writes_table_json_and_plot(tmp_path, capsys, monkeypatch):
    # the probe's figures fixed, so the floors have values known here: weight bytes / bandwidth
    monkeypatch.setattr(latency, "bandwidth", lambda **kw: {"copy_gb_s": 10.0, "fresh_gb_s": 8.0, "read_gb_s": 5.0})
    hf = make_hf_model(tmp_path / "hf")
    convert_hf(tmp_path / "hf", tmp_path / "ckpt", progress=False)
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    assert main(["bench", "decode", "--ckpt", str(tmp_path / "ckpt"), "--methods", "base,lora,switch",
                 "--batch", "1,2", "--rounds", "2", "--new-tokens", "4", "--prompt-len", "5", "--experts", "4",
                 "--rank", "4", "--expert-dtype", "bf16", "--json", str(out), "--plot", str(png)]) == 0
    data = json.loads(out.read_text())
    records = data["records"]
    keys = sorted((r["method"], r["strategy"], r["backend"], r["batch"]) for r in records)
    meta = data["meta"]
    picks = {(p["batch"], p["method"]): p["pick"] for p in meta["auto"]}
    assert sorted(picks) == [(b, m) for b in (1, 2) for m in ("base", "lora", "switch")]
    ours = Candidate.parse(picks[1, "base"]).backend  # the base: auto's pick at the first batch
    others = [c.backend for c in candidates(None, 1) if c.backend != ours]  # the base on every other backend too
    configs = ["lora/merged", "lora/unmerged", "switch/unmerged", "switch/fused", "switch/merged"]
    chosen = meta["backends"]  # every other configuration on the backend auto picks for it at the first batch
    assert sorted(chosen) == sorted(["base/-", *configs]) and chosen["base/-"] == ours
    for config in configs:  # the fastest backend of that strategy in auto's own measurement at batch 1
        method, strategy = config.split("/")
        timed = {label: ms for label, ms in next(p for p in meta["auto"] if (p["batch"], p["method"]) == (1, method))[
            "ms_per_step"].items() if label.endswith("/" + strategy)}
        assert chosen[config] == min(timed, key=timed.get).split("/")[0], (config, timed)
    assert keys == sorted([("base", "-", other, batch) for other in others for batch in (1, 2)] + [
        ("base", "-", ours, 1), ("base", "-", ours, 2)] + [
        (*config.split("/"), chosen[config], batch) for config in configs for batch in (1, 2)
        if config != "switch/merged" or batch == 1])
    for r in records:  # every ratio is to the fastest base of the batch
        base = min(b["ms_per_token"] for b in records if b["method"] == "base" and b["batch"] == r["batch"])
        assert r["ms_per_token"] > 0 and r["rounds"] == 2 and r["dtype"] == "float32"
        assert abs(r["ratio_to_base"] - r["ms_per_token"] / base) < 1e-9
    base1 = next(r for r in records if r["method"] == "base" and r["batch"] == 1)
    weight_bytes = 4 * sum(p.numel() for p in hf.parameters())  # every fp32 weight, counted by transformers
    assert meta["weight_bytes"] == weight_bytes and (meta["copy_gb_s"], meta["read_gb_s"]) == (10.0, 5.0)
    assert base1["floor_ms"] == meta["floor_ms"] == pytest.approx(weight_bytes / 10e9 * 1e3)
    assert meta["read_floor_ms"] == pytest.approx(weight_bytes / 5e9 * 1e3)
    assert png.stat().st_size > 1000
    # a saved run renders again (the reproduction re-renders its saved runs)
    table = latency_table([Record(**r) for r in records], meta)
    assert f"memory floor {meta['floor_ms']:.1f} ms/token" in table and "read floor" in table
    printed = capsys.readouterr().out
    assert meta["expert_dtype"] == "bfloat16" and "(cpu, float32, experts bfloat16, prompt 5," in printed
    assert f"| switch | merged | {chosen['switch/merged']} | 1 |" in printed
    best = min((r for r in records if r["method"] == "switch" and r["batch"] == 1), key=lambda r: r["ms_per_token"])
    fastest_base = min(r["ms_per_token"] for r in records if r["method"] == "base" and r["batch"] == 1)
    assert (f"switch, best strategy ({best['strategy']}, {best['backend']}) / base, batch 1: "
            f"{best['ms_per_token'] / fastest_base:.2f}x") in printed
    for check in meta["auto_base"]:  # auto's base pick against the fastest base this run measured
        batch = check["batch"]
        bases = {r["backend"]: r["ms_per_token"] for r in records if r["method"] == "base" and r["batch"] == batch}
        assert check["auto"] == Candidate.parse(picks[batch, "base"]).backend
        assert check["fastest"] == min(bases, key=bases.get) and check["auto_ms"] == bases[check["auto"]]
        assert check["auto_is_fastest"] == (check["auto"] == check["fastest"])
        assert f"auto's base pick at batch {batch}: {check['auto']} ({check['auto_ms']:.2f} ms/token), " in printed


def test_a_failing_configuration_is_reported_and_the_rest_timed(tmp_path):
    make_hf_model(tmp_path / "hf")
    convert_hf(tmp_path / "hf", tmp_path / "ckpt", progress=False)
    model, tok = lsjax.load(tmp_path / "ckpt")

    class Args:
        experts, top_k, rank, targets, dtype, expert_dtype = 4, 2, 4, "all-linear", "float32", None

    layerwise = random_adapter(model.config, "layerwise", Args)
    entries = [("base", "-", None, XLA), ("layerwise", "merged", layerwise, XLA),
               ("layerwise", "unmerged", layerwise, XLA)]
    records, meta = time_decode(model, tok, entries, [1], prompt_len=5, new_tokens=3, rounds=1, progress=False)
    assert [(r.method, r.strategy) for r in records] == [("base", "-"), ("layerwise", "unmerged")]
    assert len(meta["failed"]) == 1 and meta["failed"][0].startswith("layerwise/merged (xla): ConfigError")
    assert "'merged' is for methods 'lora' and 'switch'" in meta["failed"][0]


def test_methods_select_strategies_and_refuse_unknown_entries():
    from lsjax.errors import ConfigError
    from lsjax.eval.latency import select_configs

    assert select_configs("switch/fused,base") == [("base", "-"), ("switch", "fused")]
    assert select_configs("lora") == [("lora", "merged"), ("lora", "unmerged")]
    assert select_configs(["switch", "switch/merged"]) == [("switch", "unmerged"), ("switch", "fused"),
                                                           ("switch", "merged")]
    for bad, named in [("switch/fast", "'switch/fast'"), ("moe", "'moe'"), ("layerwise/merged", "'layerwise/merged'")]:
        with pytest.raises(ConfigError, match=f"--methods entry {named} is unknown.*switch/fused"):
            select_configs(bad)
    with pytest.raises(ConfigError, match="selects nothing"):
        select_configs(" , ")


def test_each_batch_size_is_timed_in_its_own_rounds(tmp_path, monkeypatch):
    """A batch-8 step's leftovers (XLA's spinning pool) must not land on a batch-1 figure."""
    from lsjax.generate import Generator

    make_hf_model(tmp_path / "hf")
    convert_hf(tmp_path / "hf", tmp_path / "ckpt", progress=False)
    model, tok = lsjax.load(tmp_path / "ckpt")
    seen = []
    generate = Generator.generate

    def recording(self, prompts, **kw):
        seen.append((id(self), len(prompts)))
        return generate(self, prompts, **kw)

    monkeypatch.setattr(Generator, "generate", recording)
    entries = [("base", "-", None, XLA), ("lora", "merged", random_adapter(model.config, "lora", _Args), XLA)]
    records, _ = time_decode(model, tok, entries, [1, 2], prompt_len=5, new_tokens=3, rounds=2, progress=False)
    assert sorted((r.method, r.batch, r.rounds) for r in records) == [("base", 1, 2), ("base", 2, 2),
                                                                       ("lora", 1, 2), ("lora", 2, 2)]
    # per batch size: each configuration compiled (one call), then per round and configuration an
    # untimed warm-up and the timed call; the batch-8 compiles come after the batch-1 figures
    assert [batch for _, batch in seen] == [1] * 10 + [2] * 10
    for start in (0, 10):
        assert seen[start][0] != seen[start + 1][0]  # both configurations compiled first
        first_round = [gen for gen, _ in seen[start + 2:start + 6]]  # then they alternate
        assert first_round[0] == first_round[1] != first_round[2] == first_round[3]


class _Args:
    experts, top_k, rank, targets, dtype, expert_dtype = 4, 2, 4, "all-linear", "float32", None


def test_a_benchmark_killed_mid_run_keeps_the_records_it_measured(tmp_path):
    """`lsjax bench decode` writes its JSON after every compile and round: killed in the middle of
    its rounds, the file parses and holds every configuration's figures so far, marked incomplete."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    out = tmp_path / "bench.json"
    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-m", "lsjax.cli", "bench", "decode", "--shape", "tiny", "--backend", "xla",
               "--methods", "base,switch/fused", "--batch", "1", "--rounds", "1000", "--new-tokens", "4",
               "--json", str(out)]
    proc = subprocess.Popen(command, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(root), "JAX_PLATFORMS": "cpu"})
    deadline, data = time.monotonic() + 120, None
    expected = len(candidates(None, 1)) + 1  # the base on every backend that can run here, switch on xla
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists():
                data = json.loads(out.read_text())
                if all((r["rounds"] or 0) >= 2 for r in data["records"]) and len(data["records"]) == expected:
                    break
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL  # it was killed, not finished
    data = json.loads(out.read_text())
    assert data["meta"]["complete"] is False and data["meta"]["copy_gb_s"] > 0
    records = {(r["method"], r["strategy"], r["backend"]): r for r in data["records"]}
    assert set(records) == {("base", "-", c.backend) for c in candidates(None, 1)} | {("switch", "fused", "xla")}
    for r in records.values():
        assert r["rounds"] >= 2 and r["ms_per_token"] > 0 and r["compile_s"] > 0 and r["run_s"] > 0
    base = min((r for r in records.values() if r["method"] == "base"), key=lambda r: r["ms_per_token"])
    assert base["ratio_to_base"] == 1.0
    switch = records["switch", "fused", "xla"]
    assert switch["ratio_to_base"] == pytest.approx(switch["ms_per_token"] / base["ms_per_token"])

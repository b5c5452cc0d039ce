"""`python -m pallas_kernels.bench --quick` end to end on CPU (XLA timings, interpreted Pallas checks):
every row's figures follow from its own time and byte count, and the JSON holds what was printed."""

import json

import pytest

from pallas_kernels import bench
from pallas_kernels.bench import main


def test_quick_bench_rows_are_consistent(tmp_path, monkeypatch):
    # the timer and the copy probe give known figures: per layer, x @ W 1 ms and the routed product
    # 3 ms at T=1 and at T=8 (the order the bench times them in), then the merge 5 ms a layer;
    # a 40 GB/s in-place copy (the ceiling) and a 20 GB/s fresh one
    times = iter([1e-3, 3e-3, 1e-3, 3e-3, 5e-3])
    monkeypatch.setattr(bench, "queued_seconds", lambda fn, args, *a, **k: next(times) * len(args[1]))
    monkeypatch.setattr(bench, "bandwidth", lambda *a, **k: {"copy_gb_s": 40.0, "fresh_gb_s": 20.0, "bytes": 1 << 20})
    out = tmp_path / "bench.json"
    rows = main(["--quick", "--groups", "qkv", "--tokens", "1,8", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["rows"] == rows and "xla_flags" in saved["env"]
    assert set(saved["interpret_checks"]) == {"sgmm_merge", "routed_group_matmul T=1", "routed_group_matmul T=8"}
    assert all(err < 1e-5 for err in saved["interpret_checks"].values())  # Pallas (interpreted) vs reference
    kernels = {(r["kernel"], r["impl"], r.get("T")) for r in rows}
    assert kernels == {("x @ W", "xla", 1), ("x @ W", "xla", 8), ("routed_group_matmul", "xla", 1),
                       ("routed_group_matmul", "xla", 8), ("sgmm_merge", "xla", None)}
    assert saved["ceiling_gbps"] == 40.0
    ms = {"x @ W": 1.0, "routed_group_matmul": 3.0}
    for r in rows:
        want_ms = ms.get(r["kernel"], 5.0 * r.get("M", 0))  # the merge's time covers its M layers
        assert r["time_ms"] == pytest.approx(want_ms)
        assert r["gbps"] == pytest.approx(r["bytes"] / want_ms / 1e6)  # bytes per ms / 1e6 = GB/s
        assert r["pct_copy"] == pytest.approx(r["gbps"] / 40.0 * 100)
        assert r.get("vs_plain", 3.0) == pytest.approx(3.0)
    # SmolLM2 q|k|v: K=576, N=576+192+192, 3 members of rank 16, top-2 of 8 experts, fp32
    K, N, experts = 576, 960, 576 * 3 * 16 + 16 * 960
    routed = next(r for r in rows if r["kernel"] == "routed_group_matmul" and r["T"] == 1)
    assert routed["bytes"] == (K * N + (K + N) + 2 * experts) * 4
    routed8 = next(r for r in rows if r["kernel"] == "routed_group_matmul" and r["T"] == 8)
    assert routed8["bytes"] == (K * N + 8 * (K + N) + 8 * experts) * 4  # min(T*k, E) = 8 experts
    merge = next(r for r in rows if r["kernel"] == "sgmm_merge")
    assert merge["M"] == 2 and merge["bytes"] == (2 * 2 * K * N + 2 * 2 * experts) * 4


def test_the_bandwidth_probe_measures_the_kinds_asked_for():
    from pallas_kernels.timing import bandwidth

    probe = bandwidth(nbytes=8 << 20, repeats=2, samples=2, kinds=("copy", "read"))
    assert set(probe) == {"bytes", "copy_gb_s", "read_gb_s"} and probe["bytes"] == 8 << 20
    assert probe["copy_gb_s"] > 0 and probe["read_gb_s"] > 0
    with pytest.raises(ValueError, match="kind 'write' is unknown"):
        bandwidth(nbytes=1 << 20, kinds=("write",))

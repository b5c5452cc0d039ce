"""`python -m pallas_kernels.bench --quick` end to end on CPU (XLA timings, interpreted Pallas checks):
every row's figures follow from its own time and byte count, and the JSON holds what was printed."""

import json

from pallas_kernels.bench import main


def test_quick_bench_rows_are_consistent(tmp_path):
    out = tmp_path / "bench.json"
    rows = main(["--quick", "--groups", "qkv", "--tokens", "1,8", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["rows"] == rows and "xla_flags" in saved["env"]
    assert set(saved["interpret_checks"]) == {"sgmm_merge", "routed_group_matmul T=1", "routed_group_matmul T=8"}
    assert all(err < 1e-5 for err in saved["interpret_checks"].values())  # Pallas (interpreted) vs reference
    kernels = {(r["kernel"], r["impl"], r.get("T")) for r in rows}
    assert kernels == {("x @ W", "xla", 1), ("x @ W", "xla", 8), ("routed_group_matmul", "xla", 1),
                       ("routed_group_matmul", "xla", 8), ("sgmm_merge", "xla", None)}
    for r in rows:
        assert abs(r["gbps"] - r["bytes"] / (r["time_ms"] / 1e3) / 1e9) < 1e-6 * r["gbps"]
        assert abs(r["pct_copy"] - 100 * r["gbps"] / saved["ceiling_gbps"]) < 1e-6 * r["pct_copy"]
        if "vs_plain" in r:
            plain = next(p for p in rows if p["kernel"] == "x @ W" and p["T"] == r["T"])
            assert abs(r["vs_plain"] - r["time_ms"] / plain["time_ms"]) < 1e-9
    # SmolLM2 q|k|v: K=576, N=576+192+192, 3 members of rank 16, top-2 of 8 experts, fp32
    K, N, experts = 576, 960, 576 * 3 * 16 + 16 * 960
    routed = next(r for r in rows if r["kernel"] == "routed_group_matmul" and r["T"] == 1)
    assert routed["bytes"] == (K * N + (K + N) + 2 * experts) * 4
    routed8 = next(r for r in rows if r["kernel"] == "routed_group_matmul" and r["T"] == 8)
    assert routed8["bytes"] == (K * N + 8 * (K + N) + 8 * experts) * 4  # min(T*k, E) = 8 experts
    merge = next(r for r in rows if r["kernel"] == "sgmm_merge")
    assert merge["M"] == 2 and merge["bytes"] == (2 * 2 * K * N + 2 * 2 * experts) * 4

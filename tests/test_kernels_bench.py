"""`python -m pallas_kernels.bench` end to end on CPU (XLA timings): every row's figures follow
from its own time and byte count, and the JSON holds what was printed."""

import json

from pallas_kernels.bench import main


def test_quick_bench_rows_are_consistent(tmp_path):
    out = tmp_path / "bench.json"
    rows = main(["--quick", "--shapes", "smollm2-135m", "--projections", "q", "--tokens", "1,8",
                 "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["rows"] == rows and saved["interpret_checks"]
    assert all(err < 1e-5 for err in saved["interpret_checks"].values())  # Pallas (interpreted) vs reference
    kernels = {(r["kernel"], r.get("T")) for r in rows}
    assert {("sgmm_merge", None), ("sgmm_switch", None), ("x @ W", 1), ("routed_lora_matmul", 1),
            ("x @ W + routed_lora_add", 1), ("routed_lora_matmul", 8), ("x @ W + routed_lora_add", 8)} <= kernels
    for r in rows:
        assert abs(r["gbps"] - r["bytes"] / (r["time_ms"] / 1e3) / 1e9) < 1e-6 * r["gbps"]
        assert abs(r["pct_copy"] - 100 * r["gbps"] / saved["ceiling_gbps"]) < 1e-6 * r["pct_copy"]
        if "vs_plain" in r:
            plain = next(p for p in rows if p["kernel"] == "x @ W" and p["T"] == r["T"])
            assert abs(r["vs_plain"] - r["time_ms"] / plain["time_ms"]) < 1e-9
    q = 576 * 576 * 4
    merge = next(r for r in rows if r["kernel"] == "sgmm_merge")
    assert merge["bytes"] == 2 * 2 * q + 2 * 2 * 16 * (576 + 576) * 4  # M=2 layers, k=2, r=16

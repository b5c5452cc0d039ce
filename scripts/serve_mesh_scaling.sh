#!/usr/bin/env bash
# Serving throughput of the tensor-parallel engine over 1, 2, 4 and 8 forced CPU devices: the scaling
# of the code path (every "device" shares this machine's cores, so it is no speed target).
#   bash scripts/serve_mesh_scaling.sh [OUT_DIR] [extra `lsjax bench serve` arguments]
set -euo pipefail
out=${1:-runs/perf/mesh}
shift || true
mkdir -p "$out"
python=${PYTHON:-.venv/bin/python}
for n in 1 2 4 8; do
  XLA_FLAGS="--xla_force_host_platform_device_count=8" JAX_PLATFORMS=cpu "$python" -m lsjax.cli bench serve \
    --tensor-parallel "$n" --backend xla --methods switch --adapters 2 --clients 8 --per-client 2 --max-output 32 \
    --json "$out/tp$n.json" "$@"
done
"$python" - "$out" <<'PY'
import json, sys
from pathlib import Path
print("| devices | method | tokens/s | x 1 device | ITL p50 ms |\n|---:|---|---:|---:|---:|")
runs = {n: json.loads((Path(sys.argv[1]) / f"tp{n}.json").read_text())["records"] for n in (1, 2, 4, 8)}
for n, records in runs.items():
    for r in records:
        one = next(b for b in runs[1] if b["method"] == r["method"] and b["clients"] == r["clients"])
        print(f"| {n} | {r['method']} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / one['tokens_per_s']:.2f} | "
              f"{r['itl_p50_ms']:.0f} |")
PY

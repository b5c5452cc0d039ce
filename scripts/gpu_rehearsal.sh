#!/usr/bin/env bash
# scripts/gpu_bench.sh rehearsed on this CPU, so a lent GPU's minutes go to figures, not fixes: a
# fresh venv holding only the GPU image's packages (scripts/venv_like_gpu.py: no gguf, fastapi,
# uvicorn, pydantic, openai...), wheels of the rest for this Python (scripts/gpu_wheels.sh), then every
# step end to end on JAX's CPU backend at the tiny shape, smaller runs of each. Passes when every step
# exits 0 and every JSON it wrote parses with records in it. The `tune` step needs a GPU and is not
# rehearsed. Needs the full venv `make setup` builds (VENV, default .venv).
#
#   bash scripts/gpu_rehearsal.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
HERE=.cache/rehearsal
start=$SECONDS
rm -rf "$HERE" && mkdir -p "$HERE"
python3 -m venv --without-pip "$HERE/venv"
"$VENV/bin/python" scripts/venv_like_gpu.py "$HERE/venv"
PY="$HERE/venv/bin/python"
DEST="$HERE/wheels" PY="$VENV/bin/python" PYTHON_VERSION=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])') \
  bash scripts/gpu_wheels.sh
# smaller than on a GPU: one batch size and round, the GPU-only tests collected (make test runs the
# rest), a short serving workload; twice the time limits (a 2-core CPU, maybe shared, is no GPU)
JAX_PLATFORMS=cpu OUT="$HERE/out" PY="$PY" WHEELS="$HERE/wheels" SHAPE=tiny ROUNDS=1 BATCHES=1 TESTS_ARGS=--co LIMIT_SCALE=2 \
  SERVE_ARGS="--clients 2 --per-client 2 --max-output 24 --max-len 64" KERNEL_SHAPE=smollm2-135m \
  KERNELS_ARGS="--quick --groups qkv,down" QKERNEL_ARGS="--quick --impls xla,pallas --groups qkv --tokens 1" \
  STEPS="env core pallas tests quantized qkernel baselines serve kernels" \
  bash scripts/gpu_bench.sh
"$PY" - "$HERE/out" <<'PY'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
for name in ("core", "pallas", "quantized", "qkernel", "baselines", "serve", "kernels"):
    data = json.loads((out / f"{name}.json").read_text())
    rows = data.get("records") or data.get("rows")
    assert rows, f"{name}.json holds no records"
    complete = data.get("meta", {}).get("complete", True)
    assert complete, f"{name}.json is not marked complete"
    print(f"{name}.json: {len(rows)} records")
PY
echo "rehearsal passed in $((SECONDS - start)) s"

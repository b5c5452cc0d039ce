#!/usr/bin/env bash
# Everything a GPU must show, in one command on a fresh GPU machine (about 8 minutes on an H100):
#   env       the device and versions
#   tests     the Pallas kernels natively (the test bodies that run interpreted on a CPU) and every
#             backend's products and the strategies end to end on the GPU
#   decode    `lsjax bench decode` at llama2-7b shape, bf16: base, switch (unmerged, fused),
#             blockwise, layerwise, lora (unmerged), batch 1 and 8, with live and peak device memory
#             against weights + experts + KV cache (none of these strategies holds weights of its own)
#   pallas    switch fused on the Pallas backend, with Triton custom calls left out of XLA's command
#             buffers (the default) and captured in them, batch 1 and 8
#   merged    the merged strategies (lora merged once, switch per token by the SGMM kernel), batch 1
#   kernels   optional: the kernel benchmark, the routed group kernel against XLA per group and SGMM
#             against a device copy (STEPS="kernels", ~90 s)
#   tune      optional: a sweep of the routed group kernel's knobs (STEPS="tune", ~2 minutes)
#   serve     optional: `lsjax bench serve` at llama2-7b shape, bf16, 8 and 32 clients: the engine
#             against static batches, switch against the base (STEPS="serve", ~2 minutes)
# Runs from the repo root without installing (the GPU image has jax, flax, optax, orbax, transformers).
# Logs and JSON go to $OUT (default runs/gpu); STEPS picks steps, e.g. STEPS="env decode".
#
#   OUT=/tmp/gpu bash scripts/gpu_bench.sh
set -u
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
STEPS=${STEPS:-"env tests decode pallas merged"}
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
# https://github.com/jax-ml/jax/issues/27988: Triton custom calls stay out of command buffers unless named
CAPTURE_TRITON='--legacy_command_buffer_custom_call_targets=__gpu$xla.gpu.triton'

step() {  # step NAME SECONDS CMD...: run with a time limit, show the log's tail, keep it in $OUT/steps.log
  local name=$1 limit=$2 start=$SECONDS log
  shift 2
  log=$(mktemp)
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" >"$log" 2>&1
  echo "== $name: rc=$? in $((SECONDS - start))s"
  grep -v -E "it/s|s/it|config/s|s/config|round/s|s/round|DeprecationWarning" "$log" | tail -n "${TAIL:-25}"
  { echo "== $name"; cat "$log"; } >>"$OUT/steps.log"  # one log file: a lent machine returns few files
  rm -f "$log"
}

decode() {  # decode NAME BATCHES METHODS [ARGS...]: lsjax bench decode at llama2-7b shape, random bf16 weights
  local name=$1 batches=$2 methods=$3
  shift 3
  step "$name" "${DECODE_LIMIT:-240}" $PY -m lsjax.cli bench decode --shape "${SHAPE:-llama2-7b}" --dtype bfloat16 \
    --batch "$batches" --methods "$methods" --rounds "${ROUNDS:-3}" --new-tokens 32 --json "$OUT/$name.json" "$@"
}

for s in $STEPS; do
  case $s in
    env) step env 60 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv;
           $PY -c 'import jax, flax, optax, transformers; print(jax.__version__, flax.__version__, optax.__version__,
           transformers.__version__, jax.devices())'" ;;
    tests) TAIL=15 step tests "${TESTS_LIMIT:-100}" $PY -m pytest -q -p no:cacheprovider -k "not interpret" \
             tests/test_kernels_routed_group.py tests/test_kernels_sgmm.py tests/test_kernels_drift_donation.py \
             tests/test_backends.py ;;
    decode) decode decode "1,8" "base,switch/unmerged,switch/fused,blockwise/unmerged,layerwise/unmerged,lora/unmerged" ;;
    pallas) DECODE_LIMIT=60 decode pallas "1,8" "base,switch/fused" --backend pallas
            (export XLA_FLAGS="${XLA_FLAGS:-} $CAPTURE_TRITON"
             DECODE_LIMIT=60 decode pallas_captured "1,8" "base,switch/fused" --backend pallas) ;;
    merged) DECODE_LIMIT=70 decode merged 1 "base,lora/merged,switch/merged" ;;
    kernels) TAIL=40 step kernels "${KERNELS_LIMIT:-90}" $PY -m pallas_kernels.bench --shapes llama2-7b --dtype bfloat16 \
               ${KERNELS_ARGS:-} --json "$OUT/kernels.json" ;;
    serve) TAIL=12 step serve "${SERVE_LIMIT:-150}" $PY -m lsjax.cli bench serve --shape "${SHAPE:-llama2-7b}" \
             --dtype bfloat16 --clients 8,32 --max-len 512 --prefill-chunk 64 --json "$OUT/serve.json" ;;
    tune) TAIL=30 step tune "${TUNE_LIMIT:-150}" $PY -m pallas_kernels.tune --budget 120 --json "$OUT/tune.json" ;;
    *) echo "unknown step $s" ;;
  esac
done

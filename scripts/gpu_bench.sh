#!/usr/bin/env bash
# Everything a GPU must show, in one command on a fresh GPU machine, steps in order of value; the
# default steps' limits add up to 8 minutes:
#   env        (20 s)  the device, versions, and that lsjax imports with the image's packages alone
#   core      (140 s)  `lsjax bench decode` at llama2-7b shape, bf16, batch 1 and 8: the base, switch
#                      unmerged and fused on XLA: the headline ratio
#   pallas    (100 s)  the same on the Pallas backend: switch fused (the routed group kernel) and
#                      merged (the SGMM all-layer merge, batch 1), against the base of the same run
#   tests      (60 s)  the Pallas kernels natively (the bodies that run interpreted on a CPU), every
#                      backend's products and strategies end to end on the GPU, and that XLA:GPU fuses
#                      a quantized weight's dequantize into its product
#   quantized  (70 s)  eval/quantized_latency.py at the same shape: bf16, int8 and 4-bit bases, switch
#                      fused over each, batch 1 and 8, on XLA (the dequantize fused into each product)
#   qkernel    (30 s)  the W8A16 / W4A16 Pallas kernel against XLA's dequantized product and the bf16
#                      product, llama2-7b's groups, 1 and 8 rows, GB/s against a device read
#   baselines  (60 s)  blockwise, layerwise and lora (merged) against the base, batch 1 and 8
# Optional (name them in STEPS):
#   serve     (150 s)  `lsjax bench serve` (engine against static batches, switch against base), then
#                      the HTTP server's tests with the `serve` wheels (scripts/gpu_wheels.sh)
#   kernels    (90 s)  the kernel benchmark: the routed group kernel against XLA, SGMM against a copy
#   tune      (150 s)  a sweep of the routed group kernel's knobs
# Every benchmark writes its JSON after each configuration it measures (a step cut by its limit
# keeps them) and logs each configuration's compile and run seconds. Runs from the repo root
# without installing (the GPU image has jax, flax, optax, orbax, transformers); what it lacks comes
# from the wheels in $WHEELS (default .whl), installed offline for the steps that need them.
# Logs and JSON go to $OUT (default runs/gpu); exits 1 if any step failed or ran out of time.
#
#   OUT=/tmp/gpu bash scripts/gpu_bench.sh
#   STEPS="env core" SHAPE=tiny ROUNDS=1 BATCHES=1 bash scripts/gpu_bench.sh   # smaller, as the rehearsal runs it
# (TESTS_ARGS, SERVE_ARGS, KERNEL_SHAPE, KERNELS_ARGS and QKERNEL_ARGS change those steps' arguments;
# LIMIT_SCALE multiplies every limit: the CPU rehearsal checks that each step works, not its GPU time)
set -u
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
STEPS=${STEPS:-"env core pallas tests quantized qkernel baselines"}
PY=${PY:-python3}
SHAPE=${SHAPE:-llama2-7b}
BATCHES=${BATCHES:-1,8}
WHEELS=${WHEELS:-.whl}
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
FAILED=()

step() {  # step NAME SECONDS CMD...: run with a time limit, show the log's tail, keep it in $OUT/steps.log
  local name=$1 limit=$(( $2 * ${LIMIT_SCALE:-1} )) start=$SECONDS log rc
  shift 2
  log=$(mktemp)
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" >"$log" 2>&1
  rc=$?
  echo "== $name: rc=$rc in $((SECONDS - start))s"
  [ $rc -eq 0 ] || FAILED+=("$name(rc=$rc)")
  grep -v -E "it/s|s/it|config/s|s/config|round/s|s/round|Warning" "$log" | tail -n "${TAIL:-25}"
  { echo "== $name: rc=$rc in $((SECONDS - start))s"; cat "$log"; } >>"$OUT/steps.log"  # one file: few come back
  rm -f "$log"
}

decode() {  # decode NAME LIMIT BATCHES METHODS [ARGS...]: lsjax bench decode at $SHAPE, random bf16 weights
  local name=$1 limit=$2 batches=$3 methods=$4
  shift 4
  step "$name" "$limit" $PY -m lsjax.cli bench decode --shape "$SHAPE" --dtype bfloat16 --batch "$batches" \
    --methods "$methods" --rounds "${ROUNDS:-3}" --new-tokens 32 --json "$OUT/$name.json" "$@"
}

wheel_site() {  # the wheels in $WHEELS installed offline into a new folder (printed), or nothing without wheels
  local site
  ls "$WHEELS"/*.whl >/dev/null 2>&1 || return 0
  site=$(mktemp -d)
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$WHEELS"/*.whl >&2 &&
    echo "$site"
}

for s in $STEPS; do
  case $s in
    env) step env 20 bash -c "(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null ||
           echo 'no nvidia-smi'); $PY -c 'import jax, flax, optax, transformers, lsjax.cli, lsjax.generate; \
print(jax.__version__, flax.__version__, optax.__version__, transformers.__version__, jax.devices())'" ;;
    core) decode core 140 "$BATCHES" "base,switch/unmerged,switch/fused" ;;
    pallas) decode pallas 100 "$BATCHES" "base,switch/fused,switch/merged" --backend pallas ;;
    tests) TAIL=15 step tests 60 $PY -m pytest -q -p no:cacheprovider -k "not interpret" ${TESTS_ARGS:-} \
             tests/test_kernels_routed_group.py tests/test_kernels_sgmm.py tests/test_kernels_drift_donation.py \
             tests/test_kernels_quantized.py \
             tests/test_backends.py tests/test_decode_lowering.py::test_a_quantized_product_reads_its_integers_on_xla_gpu ;;
    quantized) step quantized 70 $PY eval/quantized_latency.py --shape "$SHAPE" --dtype bfloat16 --backend xla \
                 --batch "$BATCHES" --tokens 16 --rounds "${ROUNDS:-3}" --json "$OUT/quantized.json" ;;
    qkernel) TAIL=20 step qkernel 30 $PY -m pallas_kernels.bench --kernels quantized --shapes "${KERNEL_SHAPE:-llama2-7b}" \
               --groups qkv,gate_up,down --layers 4 --repeats 10 --samples 3 ${QKERNEL_ARGS:-} --json "$OUT/qkernel.json" ;;
    baselines) decode baselines 60 "$BATCHES" "base,blockwise/unmerged,layerwise/unmerged,lora/merged" ;;
    serve) TAIL=12 PYTHONPATH="$PYTHONPATH:$(wheel_site)" step serve "${SERVE_LIMIT:-150}" bash -c "$PY -m lsjax.cli \
             bench serve --shape $SHAPE --dtype bfloat16 ${SERVE_ARGS:---clients 8,32 --max-len 512 --prefill-chunk 64} \
             --json $OUT/serve.json && $PY -m pytest -q -p no:cacheprovider tests/test_serve_server.py" ;;
    kernels) TAIL=40 step kernels "${KERNELS_LIMIT:-90}" $PY -m pallas_kernels.bench --shapes "${KERNEL_SHAPE:-llama2-7b}" \
               --dtype bfloat16 ${KERNELS_ARGS:-} --json "$OUT/kernels.json" ;;
    tune) TAIL=30 step tune "${TUNE_LIMIT:-150}" $PY -m pallas_kernels.tune --budget 120 --json "$OUT/tune.json" ;;
    *) echo "unknown step $s"; FAILED+=("$s(unknown)") ;;
  esac
done
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "failed: ${FAILED[*]}"
  exit 1
fi
echo "every step passed"

#!/usr/bin/env bash
# Everything that needs a GPU, in one command (a lent GPU machine starts bare and is held briefly):
#   native Pallas kernel tests, the strategies end to end on the GPU, the tile sweeps, the kernel benchmark,
#   `lsjax bench decode` at llama2-7b shape (batch 1, 8, or both in one run: `decode_b1_8`), and
#   training throughput there (`train`).
# Runs from the repo root without installing: the GPU image already has jax, flax, optax, orbax and
# transformers. Logs and JSON go to $OUT (default runs/gpu). Pick steps with STEPS="env tests ...".
#
#   OUT=/tmp/gpu STEPS="env decode_b1" bash scripts/gpu_session.sh
#
# On a lent H100 (10 min a call) the steps took: tests 100 s (TESTS_K=native: 20-50 s), tests_e2e
# 125 s, tune 170 s and more (cut short), tune_add with TUNE_TOKENS=1 65 s, decode_b1 240-290 s
# (15-60 s of compiling per configuration; METHODS=base,switch 110 s), decode_b8 for every method
# 270-290 s (compiling 30-40 s a configuration), decode_b1_8 with METHODS=base,switch/unmerged 105-117 s,
# train 45 s (lora,switch) to 55 s (layerwise,blockwise), kernels over 150 s (cut short;
# KERNELS_ARGS="--projections q,down --tokens 1": 110 s). TAG=_x appends _x to a decode step's files.
# So split them over calls, e.g.
#   STEPS="env tests decode_b1"   then   STEPS="decode_b8 kernels" KERNELS_LIMIT=300
set -u
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
STEPS=${STEPS:-"env tests tests_e2e tune tune_add decode_b1 decode_b8 kernels"}
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
# The decode bench holds the 7B weights twice (stacked + one shared per-layer copy) plus a merged copy.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}

# The package as pyproject lays it out (train/ and eval/ are lsjax.train and lsjax.eval), without pip.
SITE=$(mktemp -d)
cp -r lsjax "$SITE/"
ln -s "$PWD/train" "$SITE/lsjax/train"
ln -s "$PWD/eval" "$SITE/lsjax/eval"
ln -s "$PWD/pallas_kernels" "$SITE/pallas_kernels"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
IN_SITE=(env -C "$SITE")  # `python -m` puts the cwd first, and the repo's lsjax/ lacks train/, eval/

step() {  # step NAME SECONDS CMD...: run with a time limit, log to $OUT/NAME.log, show the tail
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  echo "== $name: rc=$? in $((SECONDS - start))s"
  grep -v -E "it/s|s/it|config/s|s/config|round/s|s/round|DeprecationWarning|return rule" "$OUT/$name.log" | tail -n "${TAIL:-25}"
}

decode() {  # decode BATCHES NAME: lsjax bench decode at llama2-7b shape, random bf16 weights
  step "$2" "${DECODE_LIMIT:-280}" "${IN_SITE[@]}" $PY -m lsjax.cli bench decode --shape "${SHAPE:-llama2-7b}" --dtype "${DTYPE:-bfloat16}" \
    --batch "$1" --methods "${METHODS:-base,lora,layerwise,blockwise,switch}" --rounds "${ROUNDS:-5}" --json "$OUT/$2.json" --plot "$OUT/$2.png"
}

for s in $STEPS; do
  case $s in
    env) step env 60 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv;
           $PY -c 'import jax, flax, optax, transformers; print(jax.__version__, flax.__version__, optax.__version__,
           transformers.__version__, jax.devices())'" ;;
    tests) TAIL=12 step tests "${TESTS_LIMIT:-150}" $PY -m pytest -q -p no:cacheprovider -x ${TESTS_K:+-k "$TESTS_K"} \
             tests/test_kernels_routed_matmul.py tests/test_kernels_sgmm.py tests/test_kernels_drift_donation.py \
             tests/test_kernels_triton_lowering.py ;;
    tests_e2e) TAIL=12 step tests_e2e "${TESTS_LIMIT:-150}" $PY -m pytest -q -p no:cacheprovider \
                 tests/test_adapters_forward.py::test_fused_projection_forms_match_numpy \
                 tests/test_generate.py::test_strategies_agree tests/test_generate.py::test_baselines_decode ;;
    tune) TAIL=30 step tune "${TUNE_LIMIT:-170}" "${IN_SITE[@]}" $PY -m pallas_kernels.tune --json "$OUT/tune.json" ;;
    tune_add) TAIL=30 step tune_add "${TUNE_LIMIT:-170}" "${IN_SITE[@]}" $PY -m pallas_kernels.tune --kernel add \
                --tokens "${TUNE_TOKENS:-1,8}" --json "$OUT/tune_add.json" ;;
    kernels) TAIL=40 step kernels "${KERNELS_LIMIT:-150}" "${IN_SITE[@]}" $PY -m pallas_kernels.bench --shapes llama2-7b --dtype bfloat16 \
               ${KERNELS_ARGS:-} --json "$OUT/kernels.json" ;;
    train) TAIL=12 step train "${TRAIN_LIMIT:-280}" "${IN_SITE[@]}" $PY -m lsjax.train.bench --shape "${SHAPE:-llama2-7b}" \
             --dtype "${DTYPE:-bfloat16}" --batch "${TRAIN_BATCH:-8}" --length "${TRAIN_LENGTH:-512}" --steps 3 \
             --methods "${TRAIN_METHODS:-lora,switch}" --json "$OUT/train.json" ;;
    decode_b1) decode 1 "decode_b1${TAG:-}" ;;
    decode_b8) decode 8 "decode_b8${TAG:-}" ;;
    decode_b1_8) decode 1,8 "decode_b1_8${TAG:-}" ;;
    *) echo "unknown step $s" ;;
  esac
done

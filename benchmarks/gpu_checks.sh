#!/usr/bin/env bash
# One device call for the kernels and options that wait for a GPU (docs/benchmarks.md, "Not yet run on a
# GPU"): each step checks correctness, then times; steps run in priority order until DEADLINE seconds from
# the start (default 570), each under its own limit, and each writes $OUT/NAME.log. BASE=DIR (optional) is
# an older tree (e.g. `git archive REV | tar -x -C DIR`) whose training step is timed beside this one's on
# the same GPU.
#
#     bash benchmarks/gpu_checks.sh                      # everything, in order
#     ONLY="compressed_hopper moe_experts" bash benchmarks/gpu_checks.sh
set -u
OUT=${OUT:-/tmp/gpu_checks}; DEADLINE=${DEADLINE:-570}; START=$(date +%s)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
TRAIN="python3 benchmarks/train_throughput.py --seq_len=4096 --batch_size=8 --attention_impl=auto --remat=none --warmup=2 --steps=3"

step() {  # step NAME SECONDS DIR COMMAND...
  local name=$1 limit=$2 dir=$3; shift 3
  [[ -n "${ONLY:-}" && " $ONLY " != *" $name "* ]] && return
  local left=$(( DEADLINE - ($(date +%s) - START) ))
  (( limit > left )) && limit=$left
  (( limit < 20 )) && { echo "=== $name: skipped (deadline)"; return; }
  echo "=== $name (limit ${limit}s): $*"
  local t0=$(date +%s)
  (cd "$dir" && PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" timeout "$limit" "$@") > "$OUT/$name.log" 2>&1
  echo "rc=$? in $(( $(date +%s) - t0 ))s" | tee -a "$OUT/$name.log"
  grep -v "^\[" "$OUT/$name.log" | tail -n 16
}

step compressed_hopper 170 . python3 benchmarks/compressed_hopper.py --seq 8192 32768 131072 --iters 5
step moe_experts 70 . python3 benchmarks/moe_experts.py
[[ -n "${BASE:-}" ]] && step laguna_base 70 "$BASE" $TRAIN --config=configs/laguna.py:small
step laguna_blocked 70 . $TRAIN --config=configs/laguna.py:small --experts_matmul=blocked
step laguna_pallas 70 . $TRAIN --config=configs/laguna.py:small --experts_matmul=pallas
step laguna_profile 80 . $TRAIN --config=configs/laguna.py:small --profile=/tmp/gpu_checks_profile --top=30
step indexer_topk 70 . python3 benchmarks/indexer_topk.py --sweep
step csa_dkv 150 . python3 benchmarks/attention.py --only csa --seq 8192,32768 --csa-dkv atomic,inverted,staged --check-csa
step deepseek_v4_default 140 . $TRAIN --config=configs/deepseek_v4.py:small
step deepseek_v4_options 140 . $TRAIN --config=configs/deepseek_v4.py:small --csa_dkv=staged --indexer_fused_topk --experts_matmul=pallas
step zaya1_pallas 80 . $TRAIN --config=configs/zaya1.py:small --experts_matmul=pallas
step kernel_tests 120 . python3 -m pytest -q -p no:cacheprovider tests/pallas_kernels/test_csa.py tests/pallas_kernels/test_grouped_matmul.py
step decode_kernels 120 . python3 benchmarks/decode_kernels.py
step msa_kernels 150 . python3 benchmarks/msa_kernels.py
echo "total $(( $(date +%s) - START ))s"

#!/usr/bin/env bash
# One device call of the long-context study (docs/long_context.md): train every family's `small` preset
# (all at once on one GPU, bounded by TRAIN_S seconds: a run cut short keeps its last 100-step checkpoint),
# then sweep and measure them; what comes back goes to $OUT.
set -u
OUT=${OUT:-/tmp/study_out}; STUDY=${STUDY:-/tmp/study}; TRAIN_S=${TRAIN_S:-330}; SWEEP_S=${SWEEP_S:-230}
ARGS="--out=$STUDY --families=deepseek_v4,zaya1,laguna,gemma4 --steps=${STEPS:-250} --batch_size=${BATCH:-32} --parallel=4 --attention_impl=${IMPL:-xla}"
mkdir -p "$OUT"
timeout "$TRAIN_S" python benchmarks/long_context_study.py $ARGS --train_only > "$OUT/train.log" 2>&1
echo "train rc=$?"
timeout "$SWEEP_S" python benchmarks/long_context_study.py $ARGS --skip_train > "$OUT/sweep.log" 2>&1
echo "sweep rc=$?"
cp "$STUDY/study.json" "$STUDY"/sweep/results.csv "$STUDY"/sweep/*.png "$OUT"/ 2>/dev/null
grep -E "trained|error|Error|^\|" "$OUT/train.log" "$OUT/sweep.log" | tail -30
for f in deepseek_v4 zaya1 laguna gemma4; do tail -1 "$STUDY/$f/metrics.jsonl" 2>/dev/null; done

#!/usr/bin/env bash
# Accuracy/KV trade-off of CHAI on SmolLM2-135M: profile, verify (static and dynamic membership), sweep.
# Usage: benchmarks/accuracy_smollm2.sh MODEL EVAL_DIR OUT_DIR [DEVICE] [LIMIT] [PART]
#   PART = verify | sweep | all. On the GPU machine MODEL is the GGUF carried there.
set -euo pipefail
model=$1 eval=$2 out=$3 device=${4:-cuda} limit=${5:-500} part=${6:-all}
tasks=piqa,hellaswag,arc_easy,boolq,copa,openbookqa,lambada,wikitext2
common=(--data-dir "$eval" --tasks "$tasks" --limit "$limit" --device "$device" --batch-size 32)
mkdir -p "$out"
if [ ! -f "$out/profile/mapping.json" ]; then
  chai-compile profile "$model" --calib "$eval/wikitext2/valid.txt" --samples 64 --seq-len 512 \
    --device "$device" --out "$out/profile" --json > "$out/profile.log"
fi
if [ "$part" != sweep ]; then
  chai-compile verify "$model" --mapping "$out/profile/mapping.json" "${common[@]}" --kv-tokens 1024 \
    --out "$out/verify-static" --json > "$out/verify-static.json"
  chai-compile verify "$model" --mapping "$out/profile/mapping.json" "${common[@]}" --membership dynamic \
    --out "$out/verify-dynamic" --json > "$out/verify-dynamic.json"
fi
if [ "$part" != verify ]; then
  chai-compile sweep "$model" --profile "$out/profile" --clusters 3,4,6 --dense-prefix 0,6,15 \
    "${common[@]}" --out "$out/sweep" --json > "$out/sweep.json"
fi

#!/bin/bash
# The demo in bfloat16 against float32, task by task (README, "What the demo does"):
#   dsembed-demo --output-dir D/auto
#   dsembed-study recipes/studies/demo-smollm2.yaml --override model.dtype=float32 --output-dir D/float32
#   bash tools/demo_dtypes.sh D        (D default: ~/dsembed-demo)
# writes D/dtypes/<variant>/report.md: each task's bf16 score against float32 with the paired
# bootstrap 95% interval of the difference (the same test items on both sides).
set -e
D=${1:-$HOME/dsembed-demo}; T=$D/dtypes
rm -rf "$T"; mkdir -p "$T/in"
for v in base model1 model5; do
  cp "$D/auto/results/$v.json" "$T/in/$v.json"
  cp "$D/float32/results/$v.json" "$T/in/$v-float32.json"   # same name and seed: told apart by the file name
  dsembed-compare "$T/in/$v.json" "$T/in/$v-float32.json" --baseline "$v-float32" --output "$T/$v" \
    --holm-family none > "$T/$v.txt"
  grep -A6 "^| dataset | category" "$T/$v/report.md"
done

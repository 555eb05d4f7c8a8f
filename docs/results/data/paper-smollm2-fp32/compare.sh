#!/bin/bash
# The evaluation dtype alone: paper run 2's model1-s0 (same trained weights) evaluated as the float32
# LoRA merge (model1-s0.json here) and as trained, bf16 backbone + bf16 adapter
# (../paper-smollm2/results/model1-s0.json), paired per dataset with bootstrap intervals.
# Usage, from the checkout: bash docs/results/data/paper-smollm2-fp32/compare.sh OUT_DIR
set -euo pipefail
OUT=${1:?output folder}
HERE=docs/results/data/paper-smollm2-fp32
mkdir -p "$OUT"
python - "$HERE/model1-s0.json" docs/results/data/paper-smollm2/results/model1-s0.json "$OUT" <<'PY'
import json, sys
from pathlib import Path
for src, name in zip(sys.argv[1:3], ["float32-merge", "bf16-adapter"]):
    data = json.loads(Path(src).read_text())
    data["model"]["name"] = name  # two names: dsembed-compare would otherwise average them as one variant
    (Path(sys.argv[3]) / f"{name}.json").write_text(json.dumps(data))
PY
dsembed-compare "$OUT/float32-merge.json" "$OUT/bf16-adapter.json" --baseline float32-merge --output "$OUT/report"

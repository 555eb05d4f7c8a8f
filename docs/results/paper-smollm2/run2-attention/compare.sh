#!/bin/bash
# Bidirectional vs causal attention with the same pooling head (paper-smollm2 run 2): model5 against
# model3 (multi-layer head), model4 against model2 (last-layer head). Exploratory contrasts added after
# the study's pre-specified comparison (every design against model1); Holm per design over its 4 categories.
#   bash docs/results/paper-smollm2/run2-attention/compare.sh [RESULTS_DIR]   (default: the saved evaluations)
set -e
R=${1:-docs/results/data/paper-smollm2/results}
D=docs/results/paper-smollm2/run2-attention
dsembed-compare $R/model3-s0.json $R/model3-s1.json $R/model5-s0.json $R/model5-s1.json $R/model2-s0.json \
  $R/model2-s1.json $R/model4-s0.json $R/model4-s1.json --baseline model3 --holm-family per_variant --output $D/vs-model3
dsembed-compare $R/model2-s0.json $R/model2-s1.json $R/model4-s0.json $R/model4-s1.json --baseline model2 \
  --holm-family per_variant --output $D/vs-model2

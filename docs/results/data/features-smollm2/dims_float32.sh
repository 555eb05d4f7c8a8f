#!/bin/bash
# The Matryoshka score-vs-size curve on a CPU without bf16 (no AVX512-BF16 / AMX: `model.dtype: auto`
# trains in float32), both models trained and scored on the same machine: model1 (the paper-smollm2
# recipe, seed 0) and model1-mrl (the same plus loss.matryoshka_dims=[64, 128, 256, 576]), each
# scored at 64, 128, 256 and 576 dimensions from one encoding, then dsembed-dims.
# The commands are the study runner's (dsembed-study prints them) for features-smollm2.yaml's two
# runs; they run here outside the study because the study checks every data file up front, and its
# mined file would cost a mining pass this curve does not need. Resumable: a finished step is skipped.
# Usage, from the checkout with ../shared/data beside it:
#   bash docs/results/data/features-smollm2/dims_float32.sh [OUT]   (default ~/dsembed-studies/dims-float32)
# model1's run may come from the paper study on this machine: MODEL1=~/dsembed-studies/paper-smollm2/models/model1-s0
set -eo pipefail
OUT=${1:-$HOME/dsembed-studies/dims-float32}
DATA=../shared/data
TRAIN="data.train=[$DATA/train/nli_triplets.jsonl, $DATA/train/paraphrase_pairs.jsonl, $DATA/train/trecqa_triplets.jsonl]"
RECIPE=recipes/paper/smollm2-135m/model1.yaml
LIMITS="--limit 256 --task-limit SciFact=32 --task-limit Cranfield=32 --task-limit NFCorpus=8 --task-limit CACM=32
        --task-limit LISA=32 --task-limit NPL=32 --task-limit Medline=30 --task-limit CysticFibrosis=32"
step() { echo "=== $(date -u +%FT%TZ) $*"; }
mkdir -p "$OUT/runs" "$OUT/models" "$OUT/dims"
train() {  # name, extra overrides
  local name=$1; shift
  [ -f "$OUT/models/$name/dsembed.json" ] && return
  step "train $name"
  /usr/bin/time -f "wall %e s" python -m dsembed.train $RECIPE "$TRAIN" "$@" train.seed=0 \
    train.output_dir="$OUT/runs/$name" train.overwrite=true
  step "export $name"
  /usr/bin/time -f "wall %e s" python -m dsembed.cli.consolidate "$OUT/runs/$name" "$OUT/models/$name.partial" --keep-adapter
  mv "$OUT/models/$name.partial" "$OUT/models/$name"
}
score() {  # name, model folder
  [ -f "$OUT/dims/$1-d576.json" ] && return
  step "evaluate $1 at 64, 128, 256 and 576 dimensions (one encoding)"
  /usr/bin/time -f "wall %e s" python -m dsembed.cli.evaluate "$2" --tasks-dir $DATA/tasks $LIMITS --batch-size 32 \
    --truncate-dim 64 128 256 576 --name "$1" --output "$OUT/dims/$1-d{dim}.json"
}
train model1-mrl "loss.matryoshka_dims=[64, 128, 256, 576]"
score model1-mrl "$OUT/models/model1-mrl"
if [ -n "$MODEL1" ]; then MODEL1_DIR=$MODEL1; else train model1; MODEL1_DIR=$OUT/models/model1; fi
score model1 "$MODEL1_DIR"
step "score against embedding size: model1-mrl against model1"
python -m dsembed.cli.dims "$OUT"/dims/*.json --baseline model1 --output "$OUT/dims-report"
step "all done"

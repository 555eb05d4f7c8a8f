#!/bin/bash
# Training-only sweep: which lr / warmup keeps every seed of model1 and model5 out of collapse (40 steps).
cd /work/main
OVR="data.train=[../shared/data/train/nli_triplets.jsonl, ../shared/data/train/paraphrase_pairs.jsonl, ../shared/data/train/trecqa_triplets.jsonl]"
OUT=~/dsembed-studies/sweep
run() {  # name model seed overrides...
  local name=$1 model=$2 seed=$3; shift 3
  [ -f $OUT/$name/TRAINED ] && return
  echo "=== $(date -u +%T) $name $*"
  /usr/bin/time -f "wall %e s" python -m dsembed.train recipes/paper/smollm2-135m/$model.yaml "$OVR" train.seed=$seed \
    train.output_dir=$OUT/$name "$@" > $OUT/$name.log 2>&1
  tail -1 $OUT/$name.log
}
run m1-s1-lr1e-3 model1 1
run m5-s0-lr5e-4 model5 0 optim.lr=5e-4 optim.head_lr=5e-4
run m1-s1-lr5e-4 model1 1 optim.lr=5e-4 optim.head_lr=5e-4
run m5-s0-wu10 model5 0 optim.warmup_steps=10
run m1-s1-wu10 model1 1 optim.warmup_steps=10
run m5-s1-lr5e-4 model5 1 optim.lr=5e-4 optim.head_lr=5e-4
run m1-s0-lr5e-4 model1 0 optim.lr=5e-4 optim.head_lr=5e-4
echo "=== $(date -u +%T) done"

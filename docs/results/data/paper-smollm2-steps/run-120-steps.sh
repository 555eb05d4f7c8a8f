#!/bin/bash
# Third round: does a longer run (120 steps, warmup 10) end the bimodal outcome of 40-step runs?
cd /work/main
OVR="data.train=[../shared/data/train/nli_triplets.jsonl, ../shared/data/train/paraphrase_pairs.jsonl, ../shared/data/train/trecqa_triplets.jsonl]"
OUT=~/dsembed-studies/sweep
train() {
  local name=$1 model=$2 seed=$3; shift 3
  [ -f $OUT/$name/checkpoints/latest ] && return
  echo "=== $(date -u +%T) train $name $*"
  /usr/bin/time -f "wall %e s" python -m dsembed.train recipes/paper/smollm2-135m/$model.yaml "$OVR" train.seed=$seed \
    train.output_dir=$OUT/$name "$@" > $OUT/$name.log 2>&1
  tail -1 $OUT/$name.log
}
sts() {
  local run=$1
  [ -f $OUT/sts-$run.json ] && return
  echo "=== $(date -u +%T) sts $run"
  [ -f $OUT/models/$run/dsembed.json ] || dsembed-consolidate $OUT/$run $OUT/models/$run > $OUT/export-$run.log 2>&1
  /usr/bin/time -f "wall %e s" dsembed-evaluate $OUT/models/$run --tasks-dir ../shared/data/tasks \
    --tasks BIOSSES SICK-R STS12 STS13 STS14 STS17 STSBenchmarkDev --limit 256 --batch-size 32 --no-progress \
    --name $run --output $OUT/sts-$run.json > $OUT/eval-$run.log 2>&1
  tail -1 $OUT/eval-$run.log
}
L120="optim.warmup_steps=10 train.max_steps=120 train.save_steps=120"
sts m1-s1-wu10
train m1-s1-120 model1 1 $L120
sts m1-s1-120
train m1-s0-120 model1 0 $L120
sts m1-s0-120
sts m5-s0-wu10
train m5-s0-120 model5 0 $L120
sts m5-s0-120
sts m1-s1-lr5e-4
echo "=== $(date -u +%T) done"

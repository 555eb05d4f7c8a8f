#!/bin/bash
# After the training sweep: export each run and score it on the 7 STS tasks at the study's limits.
cd /work/main
OUT=~/dsembed-studies/sweep
while pgrep -f sweep/run.sh > /dev/null; do sleep 10; done
for run in $(ls -d $OUT/*/ | xargs -n1 basename); do
  [ -f $OUT/$run/checkpoints/latest ] || continue
  [ -f $OUT/sts-$run.json ] && continue
  echo "=== $(date -u +%T) $run"
  [ -f $OUT/models/$run/dsembed.json ] || dsembed-consolidate $OUT/$run $OUT/models/$run > $OUT/export-$run.log 2>&1
  /usr/bin/time -f "wall %e s" dsembed-evaluate $OUT/models/$run --tasks-dir ../shared/data/tasks \
    --tasks BIOSSES SICK-R STS12 STS13 STS14 STS17 STSBenchmarkDev --limit 256 --batch-size 32 --no-progress \
    --name $run --output $OUT/sts-$run.json > $OUT/eval-$run.log 2>&1
  tail -1 $OUT/eval-$run.log
done
echo "=== $(date -u +%T) done"

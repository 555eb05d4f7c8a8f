#!/bin/bash
# The three SmolLM2-135M studies of docs/results/ on the development data, one after another, each
# resumable (run the same command again: finished stages are skipped, a killed stage is redone):
#   1. recipes/studies/paper-smollm2.yaml      the five designs, seeds 0 and 1   (issue: the paper's answer)
#   2. recipes/studies/ablations-smollm2.yaml  top4/8/16/all/no-layer-weights    (reuses 1's model1 and model5 runs, base)
#   3. recipes/studies/features-smollm2.yaml   negatives, batches, Matryoshka    (mines with 1's model1-s0; reuses
#      1's seed-0 model1/model5), then the Matryoshka score-vs-dimension evaluations and their report
#      (dsembed-dims: OUT/features-smollm2/dims-report/).
# Usage, from the checkout with ../shared/data beside it:
#   bash tools/smollm2_studies.sh [OUT]        (OUT default: ~/dsembed-studies; log it yourself, e.g. > OUT.log 2>&1)
# Evaluations saved in the repository by an earlier machine (docs/results/data/<study>/, written by
#   bash tools/save_studies.sh OUT [--commit] beside a running chain, which does for each study
#   dsembed-study recipes/studies/<study>.yaml --override "$OVERRIDE" --output-dir OUT/<study> \
#     --save-finished docs/results/data/<study>)
# are reused when OUT lacks them: a new machine does not re-evaluate what was already scored with the
# same recipe and settings, nor retrain those runs (only model1-s0, which the mining step needs).
# They were made in bf16 (model.dtype auto on a CPU with AVX512-BF16), and stage fingerprints record
# what auto resolves to: on a CPU without bf16 nothing saved matches and every run would be redone in
# float32 (hours; docs/results/data/README.md).
# docs/results/data/<study>-run1 keeps an earlier run made with other training settings: of it only
# what those settings do not touch (the untrained base's evaluation) matches, and is reused.
set -o pipefail
OUT=${1:-$HOME/dsembed-studies}
DATA=../shared/data
TRAIN="$DATA/train/nli_triplets.jsonl $DATA/train/paraphrase_pairs.jsonl $DATA/train/trecqa_triplets.jsonl"
OVERRIDE="data.train=[$DATA/train/nli_triplets.jsonl, $DATA/train/paraphrase_pairs.jsonl, $DATA/train/trecqa_triplets.jsonl]"
step() { echo "=== $(date -u +%FT%TZ) $*"; }
fail() { step "$*"; exit 1; }
saved() {  # the study's saved evaluations, then those of its earlier runs (<study>-run1, ...: the base is shared)
  for d in docs/results/data/$1 docs/results/data/$1-run*; do [ -f $d/stages.json ] && echo "--reuse $d"; done
}
study() {  # name, extra dsembed-study arguments
  local name=$1; shift
  step "start $name at $(git log --oneline -1 2>/dev/null | cut -c1-60)"
  /usr/bin/time -f "wall %e s" dsembed-study recipes/studies/$name.yaml --override "$OVERRIDE" \
    --output-dir "$OUT/$name" $(saved $name) "$@" || fail "$name failed"
  step "done $name"
}
study paper-smollm2
study ablations-smollm2 --reuse "$OUT/paper-smollm2"
# The mined file lives in OUT (which outlasts the checkout between sessions); the features study
# names it by its checkout path (recipes/studies/features-smollm2.yaml), so it is copied there.
MINED=paper-model1-s0
if [ ! -f "$OUT/mined/$MINED.mining.json" ] && [ -f runs/mined/$MINED.mining.json ]; then
  mkdir -p "$OUT/mined" && cp -p runs/mined/$MINED.jsonl runs/mined/$MINED.mining.json "$OUT/mined/"
fi
if [ ! -f "$OUT/mined/$MINED.mining.json" ]; then  # written last: its presence means the file is whole
  # a run whose evaluation was reused is not retrained; mining needs this one's model
  [ -f "$OUT/paper-smollm2/models/model1-s0/dsembed.json" ] || study paper-smollm2 --model model1-s0
  step "mine with the paper study's model1-s0"
  /usr/bin/time -f "wall %e s" dsembed-mine "$OUT/paper-smollm2/models/model1-s0" $TRAIN --negatives 1 --margin 0.95 \
    --output "$OUT/mined/$MINED.jsonl" || fail "mining failed"
fi
mkdir -p runs/mined && cp -p "$OUT/mined/$MINED.jsonl" "$OUT/mined/$MINED.mining.json" runs/mined/
study features-smollm2 --reuse "$OUT/paper-smollm2"
LIMITS="--limit 256 --task-limit SciFact=32 --task-limit Cranfield=32 --task-limit NFCorpus=8 --task-limit CACM=32
        --task-limit LISA=32 --task-limit NPL=32 --task-limit Medline=30 --task-limit CysticFibrosis=32"
mkdir -p "$OUT/features-smollm2/dims"
SAVED=docs/results/data/features-smollm2/dims  # sizes scored on an earlier machine (kept in the repository)
for m in model1-mrl model1; do
  for d in 64 128 256 576; do
    [ -f "$OUT/features-smollm2/dims/$m-d$d.json" ] || [ ! -f "$SAVED/$m-d$d.json" ] || cp "$SAVED/$m-d$d.json" "$OUT/features-smollm2/dims/"
  done
  if [ ! -f "$OUT/features-smollm2/dims/$m-d576.json" ]; then  # written last of the four
    [ -f "$OUT/features-smollm2/models/$m-s0/dsembed.json" ] || study features-smollm2 --reuse "$OUT/paper-smollm2" --model $m-s0
    # 576 is the full size (re-normalised) from the same encoding: the curve is one model's, scored
    # here, even where the study's own evaluation of the run was made on another machine (a CPU
    # without bf16 trains in float32: not the same model); same_model.py sets the two side by side
    step "evaluate $m at 64, 128, 256 and 576 dimensions (one encoding)"
    /usr/bin/time -f "wall %e s" dsembed-evaluate "$OUT/features-smollm2/models/$m-s0" --tasks-dir $DATA/tasks $LIMITS \
      --batch-size 32 --truncate-dim 64 128 256 576 --name $m --output "$OUT/features-smollm2/dims/$m-d{dim}.json" || fail "dims failed"
  fi
done
step "score against embedding size: model1-mrl against model1"
python -m dsembed.cli.dims "$OUT"/features-smollm2/dims/*.json --baseline model1 \
  --output "$OUT/features-smollm2/dims-report" || fail "dims report failed"
step "all done"

#!/bin/bash
# Keep the finished evaluations of the SmolLM2 studies (tools/smollm2_studies.sh) in the repository
# while they run: a machine handed back mid-study loses its home folder, and the next one reuses what
# was saved (`--reuse docs/results/data/<study>`) instead of evaluating it again.
# Usage, from the checkout (not the worktree the studies run from, so edits never reach a stage):
#   bash tools/save_studies.sh [OUT] [--commit] [--every SECONDS]
#     OUT       the studies' output folder (default ~/dsembed-studies)
#     --commit  commit docs/results/data after each save that changed it (nothing else is committed)
#     --every   seconds between looks (default 120); a study is saved again only when a stage of it
#               finished since (its stage-times.json changed: stages.json is written before a stage runs)
set -o pipefail
OUT=$HOME/dsembed-studies
COMMIT=0
EVERY=120
while [ $# -gt 0 ]; do
  case $1 in
    --commit) COMMIT=1 ;;
    --every) EVERY=${2:?--every needs seconds}; shift ;;
    -*) echo "tools/save_studies.sh: unknown option $1 (use [OUT] [--commit] [--every SECONDS])" >&2; exit 2 ;;
    *) OUT=$1 ;;
  esac
  shift
done
cd "$(dirname "$0")/.." || exit 2
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
DATA=../shared/data
OVERRIDE="data.train=[$DATA/train/nli_triplets.jsonl, $DATA/train/paraphrase_pairs.jsonl, $DATA/train/trecqa_triplets.jsonl]"
declare -A seen
while true; do
  for s in paper-smollm2 ablations-smollm2 features-smollm2; do
    times=$OUT/$s/stage-times.json
    [ -f "$times" ] || continue
    hash=$(md5sum < "$times")
    [ "${seen[$s]}" = "$hash" ] && continue
    seen[$s]=$hash
    nice python -m dsembed.cli.study recipes/studies/$s.yaml --override "$OVERRIDE" --output-dir "$OUT/$s" \
      --save-finished docs/results/data/$s
  done
  if [ -d "$OUT/features-smollm2/dims" ]; then  # the Matryoshka sizes (not study stages)
    mkdir -p docs/results/data/features-smollm2/dims
    cp -n "$OUT"/features-smollm2/dims/*.json docs/results/data/features-smollm2/dims/ 2>/dev/null
  fi
  if [ $COMMIT = 1 ] && [ -n "$(git status --porcelain -- docs/results/data)" ]; then
    git add docs/results/data && git commit -q -m "Studies: finished evaluations saved for reuse (docs/results/data, $(date -u +%H:%MZ))" -- docs/results/data
  fi
  sleep "$EVERY"
done

#!/bin/bash
# Run the SmolLM2 studies (tools/smollm2_studies.sh) in the background, across sessions, from a frozen
# copy of the checkout, with the saver (tools/save_studies.sh --commit) beside them.
# Usage, from the checkout (../shared/data beside it):
#   bash tools/studies_background.sh start  [OUT]           OUT default ~/dsembed-studies; log OUT/studies.log
#   bash tools/studies_background.sh status [OUT]           running / paused / not running, the last stage line
#   bash tools/studies_background.sh pause  [OUT] [REASON]  SIGSTOP the whole chain (e.g. to run tests on the
#   bash tools/studies_background.sh resume [OUT]           same cores: timings stay clean); pauses are
#                                                           logged in OUT/pauses.txt, for the wall-time reports
#   bash tools/studies_background.sh stop   [OUT]           end the chain and the saver (a killed stage is
#                                                           redone by the next start; finished ones are not)
# Why a frozen copy: bash reads a running script as it goes and every stage imports dsembed anew, so
# edits to the checkout would reach a running chain mid-way. `start` moves the copy (a detached git
# worktree, default ../studies beside the checkout: the studies' relative ../shared paths hold there)
# to the checkout's last commit (uncommitted edits are not in it), and only when no chain runs.
# STUDIES_CHECKOUT moves the copy; STUDIES_COMMAND replaces the chain (tests; no saver then).
set -o pipefail
ACTION=${1:-status}
OUT=${2:-$HOME/dsembed-studies}
REPO=$(cd "$(dirname "$0")/.." && pwd)
COPY=${STUDIES_CHECKOUT:-$(dirname "$REPO")/studies}
now() { date -u +%FT%TZ; }
alive() {  # the process group recorded in OUT/$1 still exists
  [ -f "$OUT/$1" ] && kill -0 -- "-$(cat "$OUT/$1")" 2>/dev/null
}
case $ACTION in
  start)
    if alive pgid; then echo "studies_background: a chain runs already (process group $(cat "$OUT/pgid"); stop it first)" >&2; exit 2; fi
    mkdir -p "$OUT"
    if [ -e "$COPY/.git" ]; then
      git -C "$COPY" checkout -q --detach "$(git -C "$REPO" rev-parse HEAD)" || exit 2
    else
      git -C "$REPO" worktree prune
      git -C "$REPO" worktree add -q --detach "$COPY" HEAD || exit 2
    fi
    COMMAND=${STUDIES_COMMAND:-"bash tools/smollm2_studies.sh '$OUT'"}
    cd "$COPY" || exit 2
    # a simple command in the background: its pid is setsid's, which makes itself a group leader
    PYTHONPATH=$COPY nohup setsid bash -c "exec $COMMAND" >> "$OUT/studies.log" 2>&1 < /dev/null &
    echo $! > "$OUT/pgid"
    cd "$REPO" || exit 2
    if ! alive saver.pgid && [ -z "$STUDIES_COMMAND" ]; then
      nohup setsid bash tools/save_studies.sh "$OUT" --commit >> "$OUT/saver.log" 2>&1 < /dev/null &
      echo $! > "$OUT/saver.pgid"
    fi
    echo "$(now) start at $(git -C "$COPY" log --oneline -1 | cut -c1-60) (process group $(cat "$OUT/pgid"))" >> "$OUT/pauses.txt"
    echo "started: process group $(cat "$OUT/pgid"), log $OUT/studies.log, copy $COPY"
    ;;
  status)
    if ! alive pgid; then echo "not running"
    elif ps -e -o pgid=,stat= | awk -v g="$(cat "$OUT/pgid")" '$1 == g && $2 ~ /^T/ {found=1} END {exit !found}'; then echo "paused (process group $(cat "$OUT/pgid"))"
    else echo "running (process group $(cat "$OUT/pgid"))"; fi
    [ -f "$OUT/studies.log" ] && grep -a '^\[study\|^===' "$OUT/studies.log" | tail -1 | cut -c1-160
    exit 0
    ;;
  pause|resume)
    alive pgid || { echo "studies_background: no chain runs (nothing to $ACTION)" >&2; exit 2; }
    signal=$([ "$ACTION" = pause ] && echo STOP || echo CONT)
    kill -"$signal" -- "-$(cat "$OUT/pgid")"
    echo "$(now) $ACTION${3:+ ($3)}" >> "$OUT/pauses.txt"
    echo "$ACTION: process group $(cat "$OUT/pgid")"
    ;;
  stop)
    for f in pgid saver.pgid; do
      if alive $f; then kill -CONT -- "-$(cat "$OUT/$f")"; kill -TERM -- "-$(cat "$OUT/$f")"; fi
      rm -f "$OUT/$f"
    done
    echo "$(now) stop" >> "$OUT/pauses.txt"
    echo "stopped"
    ;;
  *)
    echo "studies_background: unknown action $ACTION (start, status, pause, resume or stop)" >&2; exit 2 ;;
esac

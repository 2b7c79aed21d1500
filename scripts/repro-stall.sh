#!/usr/bin/env bash
# Runs LauncherE2E.TwoNodesAtOnce's memento-run N times, C at once, with a short hang timeout, and
# keeps the work dirs of runs that saw an uninjected hang (their agents.log) under OUTDIR.
#   scripts/repro-stall.sh BINDIR OUTDIR N C [extra memento-run args...]
set -uo pipefail
bin=$1 out=$2 n=$3 c=$4; shift 4
mkdir -p "$out"
one() {
  local i=$1; shift
  local wd=/tmp/stall-$i
  rm -rf "$wd"
  "$bin/memento-run" --simulate-nodes 4 --ranks-per-node 2 --job stall-$i --work-dir "$wd" --quiet --hang-timeout 20 \
    --ec rs:2 --spares 2 --inject node-loss:node=1:step=10 --inject node-loss:node=3:step=10 "$@" -- \
    "$bin/memento-train-example" --steps 20 --step-ms 60 --quiet >"$wd.out" 2>&1
  local rc=$?
  if grep -q '"injected":false' "$wd/timeline.json" 2>/dev/null || [ $rc -ne 0 ]; then
    echo "run $i: rc=$rc STALL"; mkdir -p "$out/$i"; cp "$wd/agents.log" "$wd/timeline.json" "$wd.out" "$out/$i/" 2>/dev/null
  fi
  rm -rf "$wd" "$wd.out"
}
export -f one; export bin out
seq 1 "$n" | xargs -P "$c" -I{} bash -c 'one {} "$@"' _ "$@"
echo "done: $(ls "$out" | wc -l) of $n runs stalled or failed"
